/* The admin API's pieces that need no server: mapping UUIDs (UUIDv5 of the name). The routes
 * are tested end to end in tests/integration/test_admin_api.py. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "esmd/admin.h"

#include <string.h>

/* Expected values from Python: uuid.uuid5(uuid.UUID("5c3c8f5e-6d1a-4f0b-9a57-3e2d7b1c8e40"),
 * name). The 64-byte name crosses a SHA-1 block boundary with the 16-byte namespace. */
static void test_mapping_uuid(void **state)
{
    char out[37];
    char x64[65];

    (void)state;
    esmd_admin_mapping_uuid("orders-from-kafka", out);
    assert_string_equal(out, "5479768f-da87-5ac2-94d6-b74353c006ec");
    esmd_admin_mapping_uuid("a", out);
    assert_string_equal(out, "954166f9-8359-5a47-91b6-8a2b6afab973");
    memset(x64, 'x', 64);
    x64[64] = '\0';
    esmd_admin_mapping_uuid(x64, out);
    assert_string_equal(out, "6bf5ec6e-037d-57cd-a994-0db1b2e1712b");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_mapping_uuid),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
