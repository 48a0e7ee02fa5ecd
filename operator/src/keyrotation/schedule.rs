//! When rotations (and backups) are due: five-field cron expressions in UTC
//! or fixed intervals, against an injectable clock.
