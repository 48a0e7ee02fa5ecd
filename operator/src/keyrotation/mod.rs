//! KeyRotationSchedule: keys generated with the operating system's CSPRNG,
//! kept in one Secret per schedule, rotated on a cron schedule or interval.

pub mod keys;
pub mod schedule;
