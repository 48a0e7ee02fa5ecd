//! KeyRotationSchedule: keys generated with the operating system's CSPRNG,
//! kept in one Secret per schedule, rotated on a cron schedule or interval
//! through a crash-safe sequence recorded in status.

pub mod controller;
pub mod keys;
pub mod rotation;
pub mod schedule;
pub mod secret;
