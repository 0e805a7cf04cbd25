-- One row per event-source mapping: the state Lambda reports for it (State,
-- StateTransitionReason, LastProcessingResult) and its runtime configuration, shared by every
-- esmd instance. Applied by `esmd migrate` in a transaction; esmd.schema_migrations records it.
CREATE SCHEMA IF NOT EXISTS esmd;

CREATE TABLE esmd.mapping_state (
    name text PRIMARY KEY,
    function text NOT NULL,
    source_kind text NOT NULL,
    enabled boolean NOT NULL DEFAULT true,
    state text NOT NULL DEFAULT 'Creating'
        CONSTRAINT mapping_state_state_check CHECK (state IN ('Creating', 'Enabling', 'Enabled',
                                                              'Disabling', 'Disabled', 'Updating',
                                                              'Deleting')),
    state_transition_reason text NOT NULL DEFAULT 'User action',
    last_processing_result text NOT NULL DEFAULT 'No records processed',
    config jsonb,
    instance_id text,
    updated_at timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE esmd.mapping_state IS 'esmd event-source mappings and their Lambda-style state';
COMMENT ON COLUMN esmd.mapping_state.state IS
    'Lambda''s State: Creating, Enabling, Enabled, Disabling, Disabled, Updating, Deleting';
COMMENT ON COLUMN esmd.mapping_state.instance_id IS 'esmd instance that last updated the row';
