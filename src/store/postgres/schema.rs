//! The PostgreSQL schema: versioned migrations, applied once each under an
//! advisory lock, so replicas that start together are safe.
//!
//! Every table is keyed by org first (Citus' distribution column), so each
//! call's writes touch one org's rows; `replicas` is small and org-free (a
//! reference table on Citus).

use tokio_postgres::Client;

use crate::store::StoreError;

/// The advisory lock the migrations run under (any fixed number; "tw" in ASCII).
const MIGRATION_LOCK: i64 = 0x7477_0001;

/// Migrations, applied in order once each; never edit one that has shipped.
const MIGRATIONS: &[&str] = &[
    // 1: calls, the daily totals and the allowance's leases, alerts,
    // captured traffic, forwarded calls, and the replicas sharing them.
    "CREATE TABLE requests (
        org TEXT NOT NULL,
        id BIGINT NOT NULL,
        replica TEXT NOT NULL,
        started_ms BIGINT NOT NULL,
        day INTEGER NOT NULL,
        project TEXT NOT NULL,
        key_id TEXT NOT NULL,
        endpoint TEXT NOT NULL,
        requested_model TEXT NOT NULL,
        served_model TEXT NOT NULL,
        grp TEXT,
        decision TEXT NOT NULL,
        reserved BIGINT NOT NULL,
        free_lane BOOLEAN NOT NULL,
        streamed BOOLEAN NOT NULL,
        shared BOOLEAN NOT NULL,
        state TEXT NOT NULL,
        input_tokens BIGINT NOT NULL DEFAULT 0,
        cached_tokens BIGINT NOT NULL DEFAULT 0,
        output_tokens BIGINT NOT NULL DEFAULT 0,
        reasoning_tokens BIGINT NOT NULL DEFAULT 0,
        free BOOLEAN NOT NULL DEFAULT false,
        cost_pico BIGINT NOT NULL DEFAULT 0,
        status INTEGER NOT NULL DEFAULT 0,
        latency_ms BIGINT NOT NULL DEFAULT 0,
        estimated BOOLEAN NOT NULL DEFAULT false,
        PRIMARY KEY (org, id)
    );
    CREATE INDEX requests_started ON requests (org, started_ms);
    CREATE INDEX requests_pending ON requests (org, replica) WHERE state = 'pending';
    CREATE TABLE daily (
        org TEXT NOT NULL,
        day INTEGER NOT NULL,
        grp TEXT NOT NULL,
        free_tokens BIGINT NOT NULL DEFAULT 0,
        billed_tokens BIGINT NOT NULL DEFAULT 0,
        cost_pico BIGINT NOT NULL DEFAULT 0,
        requests BIGINT NOT NULL DEFAULT 0,
        leased BIGINT NOT NULL DEFAULT 0,
        forfeited BIGINT NOT NULL DEFAULT 0,
        last_grant BIGINT NOT NULL DEFAULT 0,
        PRIMARY KEY (org, day, grp)
    );
    CREATE TABLE leases (
        org TEXT NOT NULL,
        day INTEGER NOT NULL,
        grp TEXT NOT NULL,
        replica TEXT NOT NULL,
        held BIGINT NOT NULL,
        reserved BIGINT NOT NULL DEFAULT 0,
        PRIMARY KEY (org, day, grp, replica)
    );
    CREATE TABLE replicas (
        id TEXT PRIMARY KEY,
        started_ms BIGINT NOT NULL,
        seen_ms BIGINT NOT NULL
    );
    CREATE SEQUENCE replica_numbers;
    CREATE TABLE alerts (
        org TEXT NOT NULL,
        day INTEGER NOT NULL,
        grp TEXT NOT NULL,
        rule TEXT NOT NULL,
        fired_ms BIGINT NOT NULL,
        text TEXT NOT NULL,
        cap BIGINT NOT NULL,
        used BIGINT NOT NULL,
        billed_cost_pico BIGINT NOT NULL,
        exhausted_at_ms BIGINT,
        attempts INTEGER NOT NULL DEFAULT 0,
        delivered BOOLEAN NOT NULL DEFAULT false,
        PRIMARY KEY (org, day, grp, rule)
    );
    CREATE TABLE captures (
        org TEXT NOT NULL,
        id BIGINT NOT NULL,
        started_ms BIGINT NOT NULL,
        project TEXT NOT NULL,
        model TEXT NOT NULL,
        endpoint TEXT NOT NULL,
        streamed BOOLEAN NOT NULL,
        input_tokens BIGINT NOT NULL,
        output_tokens BIGINT NOT NULL,
        body BYTEA NOT NULL,
        PRIMARY KEY (org, id)
    );
    CREATE INDEX captures_org_time ON captures (org, started_ms);
    CREATE TABLE forwarded (
        org TEXT NOT NULL,
        id BIGINT NOT NULL,
        started_ms BIGINT NOT NULL,
        project TEXT NOT NULL,
        key_id TEXT NOT NULL,
        method TEXT NOT NULL,
        path TEXT NOT NULL,
        status INTEGER NOT NULL,
        latency_ms BIGINT NOT NULL,
        PRIMARY KEY (org, id)
    );
    CREATE INDEX forwarded_started ON forwarded (started_ms);",
    // 2: changes made at runtime (orgs' settings, projects, keys); small
    // and read by every replica (a reference table on Citus).
    // Each replica says up to which change it runs, so that a change
    // answers once every replica runs on it.
    "CREATE TABLE changes (
        id BIGSERIAL PRIMARY KEY,
        at_ms BIGINT NOT NULL,
        org TEXT NOT NULL,
        actor TEXT NOT NULL,
        body TEXT NOT NULL
    );
    ALTER TABLE replicas ADD COLUMN changes BIGINT NOT NULL DEFAULT 0;",
    // 3: the Files API's files (for batches), in parts; keyed by org.
    "CREATE TABLE files (
        org TEXT NOT NULL,
        id TEXT NOT NULL,
        project TEXT NOT NULL,
        purpose TEXT NOT NULL,
        filename TEXT NOT NULL,
        bytes BIGINT NOT NULL,
        created_at BIGINT NOT NULL,
        complete BOOLEAN NOT NULL,
        made BIGSERIAL,
        PRIMARY KEY (org, id)
    );
    CREATE INDEX files_project ON files (org, project, created_at);
    CREATE TABLE file_parts (
        org TEXT NOT NULL,
        file_id TEXT NOT NULL,
        seq BIGINT NOT NULL,
        data BYTEA NOT NULL,
        PRIMARY KEY (org, file_id, seq)
    );",
    // 4: batches and their lines; keyed by org.
    "CREATE TABLE batches (
        org TEXT NOT NULL,
        id TEXT NOT NULL,
        project TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        status TEXT NOT NULL,
        object TEXT NOT NULL,
        made BIGSERIAL,
        PRIMARY KEY (org, id)
    );
    CREATE INDEX batches_project ON batches (org, project, created_at);
    CREATE TABLE batch_lines (
        org TEXT NOT NULL,
        batch_id TEXT NOT NULL,
        line BIGINT NOT NULL,
        custom_id TEXT NOT NULL,
        body TEXT NOT NULL,
        state TEXT NOT NULL,
        result TEXT NOT NULL,
        claimed_ms BIGINT NOT NULL DEFAULT 0,
        PRIMARY KEY (org, batch_id, line)
    );
    CREATE INDEX batch_lines_state ON batch_lines (org, batch_id, state, line);",
];

/// The schema version this tokenwarden writes.
pub fn latest() -> i64 {
    MIGRATIONS.len() as i64
}

/// Apply the migrations not yet applied, under the advisory lock; returns
/// the schema version.
pub async fn migrate(client: &mut Client) -> Result<i64, StoreError> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    let result = apply(client).await;
    // Released on every path (and by PostgreSQL if the connection drops).
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await?;
    result
}

async fn apply(client: &mut Client) -> Result<i64, StoreError> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_ms BIGINT NOT NULL)",
        )
        .await?;
    let applied = version(client).await?;
    if applied > latest() {
        return Err(StoreError::from_message(format!(
            "the database is at schema version {applied}, newer than this tokenwarden ({}); upgrade tokenwarden",
            latest()
        )));
    }
    let now_ms = crate::store::now_ms();
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied as usize) {
        let tx = client.transaction().await?;
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO schema_migrations (version, applied_ms) VALUES ($1, $2)",
            &[&(i as i32 + 1), &now_ms],
        )
        .await?;
        tx.commit().await?;
    }
    Ok(latest())
}

/// The schema version applied (0 for an empty database).
pub async fn version(client: &Client) -> Result<i64, StoreError> {
    let exists: bool = client
        .query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[])
        .await?
        .get(0);
    if !exists {
        return Ok(0);
    }
    let row = client
        .query_one(
            "SELECT COALESCE(MAX(version), 0)::BIGINT FROM schema_migrations",
            &[],
        )
        .await?;
    Ok(row.get(0))
}
