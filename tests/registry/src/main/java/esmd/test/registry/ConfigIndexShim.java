package esmd.test.registry;

import io.apicurio.common.apps.config.DynamicConfigPropertyList;
import java.util.List;
import javax.enterprise.inject.Produces;
import javax.inject.Singleton;

/**
 * The bean that Apicurio's config-index Quarkus extension would make at build time (the list of
 * properties an administrator may change at run time), here empty: that extension's deployment
 * artifact is not on Maven Central as this machine sees it, and the tests change no property.
 */
public class ConfigIndexShim {
    @Produces
    @Singleton
    DynamicConfigPropertyList dynamicConfigProperties() {
        return new DynamicConfigPropertyList(List.of());
    }
}
