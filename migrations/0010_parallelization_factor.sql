-- ParallelizationFactor of event-source mappings through the admin API (UpdateEventSourceMapping;
-- docs/admin.md, docs/design.md#lanes). NULL: the configuration file's parallelization_factor.
ALTER TABLE esmd.mapping_overrides
    ADD COLUMN parallelization_factor integer
        CONSTRAINT mapping_overrides_parallelization_factor_check
        CHECK (parallelization_factor BETWEEN 1 AND 10);
