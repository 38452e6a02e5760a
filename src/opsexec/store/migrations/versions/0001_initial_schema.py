"""Initial schema: enums, the eight core tables, supporting tables, timeout policies.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from opsexec.store.migrate import execute_script

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    execute_script("""
    CREATE TYPE execution_status AS ENUM (
        'pending', 'awaiting_approval', 'approved', 'running',
        'succeeded', 'failed', 'cancelled', 'rejected'
    );
    CREATE TYPE execution_mode AS ENUM ('immediate', 'background');
    CREATE TYPE sla_class AS ENUM ('fast', 'medium', 'long');
    CREATE TYPE approval_state AS ENUM ('pending', 'approved', 'rejected', 'expired');

    -- Supporting tables --------------------------------------------------------------

    CREATE TABLE tenants (
        id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        name        varchar(100) NOT NULL,
        settings    jsonb NOT NULL DEFAULT '{}'::jsonb,
        created_at  timestamptz NOT NULL DEFAULT now(),
        updated_at  timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT uq_tenants_name UNIQUE (name)
    );

    CREATE TABLE users (
        id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        tenant_id   uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
        principal   varchar(255) NOT NULL,
        roles       text[] NOT NULL DEFAULT '{}',
        disabled    boolean NOT NULL DEFAULT false,
        is_system   boolean NOT NULL DEFAULT false,
        created_at  timestamptz NOT NULL DEFAULT now(),
        updated_at  timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT uq_users_tenant_principal UNIQUE (tenant_id, principal)
    );

    -- API keys are random 256-bit tokens, so a plain SHA-256 is a safe, fast verifier
    -- (slow hashes protect low-entropy passwords, which these are not).
    CREATE TABLE api_keys (
        id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        tenant_id     uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
        user_id       uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
        key_prefix    varchar(16) NOT NULL,
        key_hash      char(64) NOT NULL,
        name          varchar(100),
        created_at    timestamptz NOT NULL DEFAULT now(),
        last_used_at  timestamptz,
        revoked_at    timestamptz,
        CONSTRAINT uq_api_keys_hash UNIQUE (key_hash)
    );
    CREATE INDEX ix_api_keys_user ON api_keys (user_id);

    CREATE TABLE assets (
        id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        tenant_id       uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
        name            varchar(255) NOT NULL,
        address         varchar(255) NOT NULL,
        transport       varchar(20) NOT NULL DEFAULT 'ssh',
        port            int,
        environment     varchar(50) NOT NULL DEFAULT 'dev',
        tags            text[] NOT NULL DEFAULT '{}',
        credential_ref  varchar(255),
        host_key        text,
        metadata        jsonb NOT NULL DEFAULT '{}'::jsonb,
        created_at      timestamptz NOT NULL DEFAULT now(),
        updated_at      timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT uq_assets_tenant_name UNIQUE (tenant_id, name),
        CONSTRAINT valid_asset_port CHECK (port IS NULL OR port BETWEEN 1 AND 65535)
    );

    CREATE TABLE credentials (
        id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        tenant_id   uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
        name        varchar(255) NOT NULL,
        kind        varchar(20) NOT NULL,
        username    varchar(255),
        nonce       bytea NOT NULL,
        ciphertext  bytea NOT NULL,
        key_id      varchar(64) NOT NULL,
        created_at  timestamptz NOT NULL DEFAULT now(),
        updated_at  timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT uq_credentials_tenant_name UNIQUE (tenant_id, name),
        CONSTRAINT valid_credential_kind
            CHECK (kind IN ('password', 'ssh_key', 'token', 'generic'))
    );

    CREATE TABLE timeout_policies (
        id                    varchar(50) PRIMARY KEY,
        sla_class             sla_class NOT NULL,
        action_class          varchar(20) NOT NULL,
        execution_timeout_ms  int NOT NULL,
        step_timeout_ms       int NOT NULL,
        lease_timeout_ms      int NOT NULL,
        max_lease_renewals    int NOT NULL DEFAULT 3,
        description           text,
        created_at            timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT uq_timeout_policy_class UNIQUE (sla_class, action_class),
        CONSTRAINT valid_action_class CHECK (action_class IN ('read', 'modify', 'deploy')),
        CONSTRAINT valid_policy_timeouts
            CHECK (execution_timeout_ms > 0 AND step_timeout_ms > 0),
        CONSTRAINT valid_lease_timeout CHECK (lease_timeout_ms >= step_timeout_ms)
    );

    -- Core tables --------------------------------------------------------------------

    CREATE TABLE executions (
        id                       uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        tenant_id                uuid NOT NULL REFERENCES tenants (id),
        actor_id                 uuid NOT NULL REFERENCES users (id),
        request_id               uuid,
        idempotency_key          varchar(255) NOT NULL,
        idempotency_active       boolean NOT NULL DEFAULT true,
        plan_hash                varchar(64) NOT NULL,
        plan_snapshot            jsonb NOT NULL,
        plan_size_bytes          int NOT NULL,
        step_count               int NOT NULL,
        target_count             int NOT NULL,
        execution_mode           execution_mode NOT NULL,
        approval_level           int NOT NULL,
        sla_class                sla_class NOT NULL,
        status                   execution_status NOT NULL DEFAULT 'pending',
        created_at               timestamptz NOT NULL DEFAULT now(),
        started_at               timestamptz,
        ended_at                 timestamptz,
        duration_ms              int,
        queue_wait_ms            int,
        cancelled_by             uuid REFERENCES users (id),
        cancelled_at             timestamptz,
        cancellation_reason      text,
        timeout_ms               int,
        timed_out                boolean NOT NULL DEFAULT false,
        result_summary           jsonb,
        error_class              varchar(100),
        error_message            text,
        retries_total            int NOT NULL DEFAULT 0,
        ws_events_emitted        int NOT NULL DEFAULT 0,
        worker_id                varchar(100),
        lease_renewals           int NOT NULL DEFAULT 0,
        cancel_checks_performed  int NOT NULL DEFAULT 0,
        last_transition_at       timestamptz,
        last_transition_by       uuid REFERENCES users (id),
        last_transition_from     execution_status,
        timeout_policy_id        varchar(50) REFERENCES timeout_policies (id),
        metadata                 jsonb NOT NULL DEFAULT '{}'::jsonb,
        CONSTRAINT valid_approval_level CHECK (approval_level BETWEEN 0 AND 3),
        CONSTRAINT valid_timing CHECK (
            (started_at IS NULL OR started_at >= created_at)
            AND (ended_at IS NULL OR started_at IS NULL OR ended_at >= started_at)
        ),
        CONSTRAINT valid_duration CHECK (duration_ms IS NULL OR duration_ms >= 0),
        CONSTRAINT valid_queue_wait CHECK (queue_wait_ms IS NULL OR queue_wait_ms >= 0),
        CONSTRAINT valid_timeout CHECK (timeout_ms IS NULL OR timeout_ms > 0),
        CONSTRAINT valid_cancellation CHECK ((cancelled_by IS NULL) = (cancelled_at IS NULL)),
        CONSTRAINT valid_result_size CHECK (
            result_summary IS NULL OR pg_column_size(result_summary) <= 10240
        )
    );
    -- R-IDEM-3: the key is unique only while it is active; it retires when the
    -- execution fails, is cancelled or rejected, or its replay window passes.
    CREATE UNIQUE INDEX ux_exec_tenant_idem ON executions (tenant_id, idempotency_key)
        WHERE idempotency_active;
    CREATE INDEX ix_exec_tenant_status_created
        ON executions (tenant_id, status, created_at DESC);
    CREATE INDEX ix_exec_request ON executions (request_id);
    CREATE INDEX ix_exec_actor ON executions (actor_id, created_at DESC);
    CREATE INDEX ix_exec_cancelled ON executions (cancelled_at)
        WHERE cancelled_by IS NOT NULL;
    CREATE INDEX ix_exec_timeout ON executions (created_at) WHERE timed_out;
    CREATE INDEX ix_exec_sla_duration ON executions (sla_class, duration_ms)
        WHERE duration_ms IS NOT NULL;

    CREATE TABLE execution_steps (
        id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        execution_id     uuid NOT NULL REFERENCES executions (id) ON DELETE CASCADE,
        step_number      int NOT NULL,
        step_key         varchar(100) NOT NULL,
        action           varchar(100) NOT NULL,
        target_type      varchar(50),
        target_ref       varchar(255),
        status           execution_status NOT NULL DEFAULT 'pending',
        attempt          int NOT NULL DEFAULT 1,
        max_retries      int NOT NULL DEFAULT 3,
        started_at       timestamptz,
        ended_at         timestamptz,
        duration_ms      int,
        timeout_ms       int,
        timed_out        boolean NOT NULL DEFAULT false,
        output_ref       varchar(500),
        output_summary   jsonb,
        output_size_bytes bigint,
        error_class      varchar(100),
        error_message    text,
        metadata         jsonb NOT NULL DEFAULT '{}'::jsonb,
        CONSTRAINT uq_step_execution_number UNIQUE (execution_id, step_number),
        CONSTRAINT valid_attempt CHECK (attempt >= 1 AND attempt <= max_retries + 1),
        CONSTRAINT valid_step_timing CHECK (
            ended_at IS NULL OR started_at IS NULL OR ended_at >= started_at
        ),
        CONSTRAINT valid_step_timeout CHECK (timeout_ms IS NULL OR timeout_ms > 0),
        CONSTRAINT valid_output_size CHECK (
            output_summary IS NULL OR pg_column_size(output_summary) <= 10240
        )
    );
    CREATE INDEX ix_steps_execution ON execution_steps (execution_id);
    CREATE INDEX ix_steps_execution_status ON execution_steps (execution_id, status);
    CREATE INDEX ix_steps_action_status ON execution_steps (action, status);
    CREATE INDEX ix_steps_target_action ON execution_steps (target_ref, action)
        WHERE target_ref IS NOT NULL;
    CREATE INDEX ix_steps_timed_out ON execution_steps (execution_id, timed_out)
        WHERE timed_out;

    CREATE TABLE approvals (
        id                    uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        execution_id          uuid NOT NULL REFERENCES executions (id) ON DELETE CASCADE,
        step_number           int,
        approval_level        int NOT NULL,
        required_role         varchar(50),
        plan_hash             varchar(64) NOT NULL,
        plan_snapshot_hash    varchar(64) NOT NULL,
        approver_id           uuid REFERENCES users (id),
        approver_principal    varchar(255),
        auth_method           varchar(50),
        source_ip             inet,
        state                 approval_state NOT NULL DEFAULT 'pending',
        decided_at            timestamptz,
        reason                text,
        runbook_url           text,
        created_at            timestamptz NOT NULL DEFAULT now(),
        expires_at            timestamptz,
        auto_approved         boolean NOT NULL DEFAULT false,
        auto_approval_policy  varchar(100),
        invalidated_at        timestamptz,
        metadata              jsonb NOT NULL DEFAULT '{}'::jsonb,
        CONSTRAINT valid_approval_level CHECK (approval_level BETWEEN 0 AND 3),
        CONSTRAINT valid_approval_timing CHECK (decided_at IS NULL OR decided_at >= created_at),
        CONSTRAINT runbook_required_for_high_level
            CHECK (approval_level < 2 OR runbook_url IS NOT NULL),
        -- An expired approval was decided by the clock, not by a person.
        CONSTRAINT approver_required_for_decision CHECK (
            state IN ('pending', 'expired') OR approver_id IS NOT NULL OR auto_approved
        )
    );
    CREATE INDEX ix_approvals_execution ON approvals (execution_id, step_number);
    CREATE INDEX ix_approvals_pending_expiry ON approvals (expires_at)
        WHERE state = 'pending';

    CREATE TABLE execution_events (
        id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        seq           bigint GENERATED ALWAYS AS IDENTITY,
        execution_id  uuid NOT NULL REFERENCES executions (id) ON DELETE CASCADE,
        step_id       uuid REFERENCES execution_steps (id) ON DELETE CASCADE,
        "timestamp"   timestamptz NOT NULL DEFAULT clock_timestamp(),
        event_kind    varchar(50) NOT NULL,
        payload       jsonb NOT NULL DEFAULT '{}'::jsonb,
        metadata      jsonb NOT NULL DEFAULT '{}'::jsonb,
        CONSTRAINT uq_events_seq UNIQUE (seq)
    );
    CREATE INDEX ix_events_execution_seq ON execution_events (execution_id, seq);
    CREATE INDEX ix_events_kind_timestamp ON execution_events (event_kind, "timestamp");

    CREATE TABLE execution_queue (
        id                uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        execution_id      uuid NOT NULL REFERENCES executions (id) ON DELETE CASCADE,
        priority          int NOT NULL DEFAULT 50,
        status            varchar(20) NOT NULL DEFAULT 'queued',
        leased_by         varchar(100),
        leased_at         timestamptz,
        lease_expires_at  timestamptz,
        lease_token       uuid,
        lease_count       int NOT NULL DEFAULT 0,
        queued_at         timestamptz NOT NULL DEFAULT now(),
        available_at      timestamptz NOT NULL DEFAULT now(),
        started_at        timestamptz,
        completed_at      timestamptz,
        attempt           int NOT NULL DEFAULT 0,
        max_attempts      int NOT NULL DEFAULT 3,
        last_error        text,
        metadata          jsonb NOT NULL DEFAULT '{}'::jsonb,
        CONSTRAINT valid_queue_priority CHECK (priority BETWEEN 0 AND 100),
        CONSTRAINT valid_queue_status
            CHECK (status IN ('queued', 'leased', 'completed', 'failed')),
        CONSTRAINT valid_lease CHECK ((leased_by IS NULL) = (leased_at IS NULL)),
        CONSTRAINT valid_queue_attempt CHECK (attempt >= 0 AND max_attempts >= 1)
    );
    CREATE INDEX ix_queue_ready ON execution_queue (priority, queued_at)
        WHERE status = 'queued';
    CREATE INDEX ix_queue_lease_expiry ON execution_queue (lease_expires_at)
        WHERE status = 'leased';
    CREATE INDEX ix_queue_execution ON execution_queue (execution_id);
    CREATE INDEX ix_queue_leased_by ON execution_queue (leased_by, leased_at DESC);

    CREATE TABLE execution_dlq (
        id                 uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        execution_id       uuid NOT NULL REFERENCES executions (id) ON DELETE CASCADE,
        original_queue_id  uuid,
        failed_at          timestamptz NOT NULL DEFAULT now(),
        attempt_count      int NOT NULL,
        last_error         text,
        plan_snapshot      jsonb NOT NULL,
        execution_context  jsonb NOT NULL DEFAULT '{}'::jsonb,
        requeued_at        timestamptz,
        metadata           jsonb NOT NULL DEFAULT '{}'::jsonb
    );
    CREATE INDEX ix_dlq_execution ON execution_dlq (execution_id);
    CREATE INDEX ix_dlq_failed_at ON execution_dlq (failed_at DESC);

    CREATE TABLE execution_locks (
        id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        lock_key      varchar(500) NOT NULL,
        execution_id  uuid NOT NULL REFERENCES executions (id) ON DELETE CASCADE,
        owner_tag     varchar(100) NOT NULL,
        acquired_at   timestamptz NOT NULL DEFAULT now(),
        expires_at    timestamptz NOT NULL,
        metadata      jsonb NOT NULL DEFAULT '{}'::jsonb,
        CONSTRAINT uq_lock_key UNIQUE (lock_key)
    );
    -- A predicate calling now() is not immutable, so expiry is indexed plainly.
    CREATE INDEX ix_locks_expires ON execution_locks (expires_at);
    CREATE INDEX ix_locks_execution ON execution_locks (execution_id);

    CREATE TABLE artifacts (
        id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        tenant_id     uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
        execution_id  uuid NOT NULL REFERENCES executions (id) ON DELETE CASCADE,
        step_id       uuid REFERENCES execution_steps (id) ON DELETE CASCADE,
        content_type  varchar(100) NOT NULL,
        size_bytes    bigint NOT NULL,
        sha256        char(64) NOT NULL,
        content       bytea NOT NULL,
        created_at    timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX ix_artifacts_execution ON artifacts (execution_id);

    -- Security and administration events that belong to no execution: a foreign-tenant
    -- asset probe, a settings change, a key revocation.
    CREATE TABLE audit_log (
        id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        seq          bigint GENERATED ALWAYS AS IDENTITY,
        tenant_id    uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
        actor_id     uuid REFERENCES users (id),
        event_kind   varchar(50) NOT NULL,
        severity     varchar(20) NOT NULL DEFAULT 'info',
        payload      jsonb NOT NULL DEFAULT '{}'::jsonb,
        created_at   timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT valid_audit_severity CHECK (severity IN ('info', 'warning', 'critical'))
    );
    CREATE INDEX ix_audit_tenant_created ON audit_log (tenant_id, created_at DESC);
    CREATE INDEX ix_audit_kind_created ON audit_log (event_kind, created_at DESC);

    INSERT INTO timeout_policies
        (id, sla_class, action_class, execution_timeout_ms, step_timeout_ms,
         lease_timeout_ms, description)
    VALUES
        ('fast_read',     'fast',   'read',    10000,   5000,  15000,
         'Quick lookups answered inside the request'),
        ('medium_read',   'medium', 'read',    30000,  15000,  45000,
         'Reads that take tens of seconds'),
        ('medium_modify', 'medium', 'modify',  30000,  20000,  60000,
         'Restarts and similar changes; also serves fast modify plans'),
        ('long_read',     'long',   'read',   600000,  60000, 180000,
         'Long-running reads across many hosts'),
        ('long_modify',   'long',   'modify', 600000, 120000, 360000,
         'Long-running changes across many hosts'),
        ('long_deploy',   'long',   'deploy', 600000, 180000, 540000,
         'Deployments of any size');
    """)


def downgrade() -> None:
    execute_script("""
    DROP TABLE IF EXISTS audit_log, artifacts, execution_locks, execution_dlq, execution_queue,
        execution_events, approvals, execution_steps, executions, timeout_policies,
        credentials, assets, api_keys, users, tenants;
    DROP TYPE IF EXISTS approval_state, sla_class, execution_mode, execution_status;
    """)
