//! Tenant API keys: created once, shown once, stored only as SHA-256.

use std::collections::HashMap;
use std::sync::RwLock;

use ledger_schemas::TenantId;
use sha2::{Digest, Sha256};
use sqlx::PgPool;

#[derive(Debug, thiserror::Error)]
pub enum TenantError {
    #[error(transparent)]
    Name(#[from] ledger_schemas::ids::InvalidTenant),
    #[error("tenant {0} exists already")]
    Exists(String),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

fn hash(key: &str) -> Vec<u8> {
    Sha256::digest(key.as_bytes()).to_vec()
}

/// Creates tenant `name` and returns its API key, which is not stored.
pub async fn create(pool: &PgPool, name: &str) -> Result<String, TenantError> {
    let tenant = TenantId::parse(name)?;
    let key = format!("lk_{}", hex::encode(rand::random::<[u8; 24]>()));
    let inserted = sqlx::query(
        "-- ingest::tenants::create
         INSERT INTO tenants (tenant_id, api_key_hash) VALUES ($1, $2) ON CONFLICT (tenant_id) DO NOTHING",
    )
    .bind(tenant.as_str())
    .bind(hash(&key))
    .execute(pool)
    .await?;
    if inserted.rows_affected() == 0 {
        return Err(TenantError::Exists(name.to_owned()));
    }
    Ok(key)
}

/// Resolves API keys to tenants, remembering the keys it has seen.
#[derive(Default)]
pub struct Authenticator {
    known: RwLock<HashMap<Vec<u8>, TenantId>>,
}

impl Authenticator {
    pub async fn tenant(&self, pool: &PgPool, key: &str) -> Result<Option<TenantId>, sqlx::Error> {
        let h = hash(key);
        if let Some(t) = self.known.read().ok().and_then(|m| m.get(&h).cloned()) {
            return Ok(Some(t));
        }
        let found: Option<String> = sqlx::query_scalar(
            "-- ingest::tenants::Authenticator::tenant
             SELECT tenant_id FROM tenants WHERE api_key_hash = $1",
        )
        .bind(&h)
        .fetch_optional(pool)
        .await?;
        let tenant = found.map(TenantId);
        if let (Some(t), Ok(mut m)) = (&tenant, self.known.write()) {
            m.insert(h, t.clone());
        }
        Ok(tenant)
    }
}

/// Creates `name`, or gives it a new API key if it exists (the old key stops
/// working). Used by the demo, which cannot read back a stored key.
pub async fn rotate(pool: &PgPool, name: &str) -> Result<String, TenantError> {
    let tenant = TenantId::parse(name)?;
    let key = format!("lk_{}", hex::encode(rand::random::<[u8; 24]>()));
    sqlx::query(
        "-- ingest::tenants::rotate
         INSERT INTO tenants (tenant_id, api_key_hash) VALUES ($1, $2)
         ON CONFLICT (tenant_id) DO UPDATE SET api_key_hash = EXCLUDED.api_key_hash",
    )
    .bind(tenant.as_str())
    .bind(hash(&key))
    .execute(pool)
    .await?;
    Ok(key)
}
