//! BackupPolicy: scheduled `pg_dump` backups of an endpoint's database,
//! encrypted with the policy's aes-256 key schedule, written to a volume or
//! an S3 bucket with a manifest, pruned by retention and restored on a
//! schedule into a scratch database to prove they restore.

pub mod agent;
pub mod controller;
pub mod job;
pub mod manifest;
pub mod plan;
pub mod restore;
pub mod store;
