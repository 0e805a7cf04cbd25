-- Run-time changes to event-source mappings made through the admin API
-- (UpdateEventSourceMapping, /admin/mappings/{name}/pause|resume; docs/admin.md).
--
-- One row per mapping name. A NULL column is "not overridden": the configuration file's value
-- applies. An override wins over the file while it exists; it goes away with
-- DELETE /admin/mappings/{name}/overrides, or field by field when the file's value for that
-- field changes (`yaml` keeps the file's value each field was overridden against; esmd compares
-- it with the file at start-up).
--
-- Every change sends NOTIFY esmd_mapping_overrides with the mapping name as payload in the same
-- transaction; every esmd instance LISTENs and re-reads that row.
CREATE SCHEMA IF NOT EXISTS esmd;

CREATE TABLE esmd.mapping_overrides (
    name text PRIMARY KEY,
    enabled boolean,
    batch_size integer CONSTRAINT mapping_overrides_batch_size_check
        CHECK (batch_size BETWEEN 1 AND 10000),
    window_ms integer CONSTRAINT mapping_overrides_window_ms_check
        CHECK (window_ms BETWEEN 0 AND 300000),
    filters jsonb CONSTRAINT mapping_overrides_filters_check
        CHECK (filters IS NULL OR jsonb_typeof(filters) = 'array'),
    on_failure text,
    yaml jsonb NOT NULL DEFAULT '{}',
    updated_at timestamptz NOT NULL DEFAULT now(),
    updated_by text
);

COMMENT ON TABLE esmd.mapping_overrides IS
    'esmd: admin API changes to event-source mappings; NULL = the configuration file''s value';
COMMENT ON COLUMN esmd.mapping_overrides.filters IS
    'FilterCriteria patterns as a JSON array of pattern texts; [] = no filtering';
COMMENT ON COLUMN esmd.mapping_overrides.on_failure IS
    'on-failure destination URI; '''' = none (DestinationConfig {"OnFailure":{"Destination":""}})';
COMMENT ON COLUMN esmd.mapping_overrides.yaml IS
    'the configuration file''s value of each overridden field when it was overridden';
