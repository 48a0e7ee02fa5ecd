//! The backup Job's dump against a real PostgreSQL 15 serving TLS with a
//! certificate from a private CA made here (openssl): the very script and
//! the environment the operator renders (`sslmode=verify-full`,
//! `PGSSLROOTCERT` at the mounted `spec.database.caSecret`). With the right
//! CA it connects and dumps; with no CA or another CA it refuses to.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use fhir_operator::api::{DatabaseSpec, SslMode};
use fhir_operator::backup::job::{DUMP_SCRIPT, dump_env};
use fhir_operator::fhirendpoint::validate::check_database;
use fhir_operator_e2e::postgres::{Postgres, bin_dir, hand_over, run};

/// A CA (key and certificate) named `name` in `dir`.
fn ca(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let (key, cert) = (dir.join(format!("{name}.key")), dir.join(format!("{name}.crt")));
    run(Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1"])
        .args(["-subj", &format!("/CN={name}"), "-addext", "basicConstraints=critical,CA:TRUE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert))
    .expect("openssl: a CA");
    (key, cert)
}

/// A server certificate for `localhost` signed by the CA, in `dir`.
fn server_cert(dir: &Path, ca_key: &Path, ca_cert: &Path) -> (PathBuf, PathBuf) {
    let (key, csr, cert) = (dir.join("server.key"), dir.join("server.csr"), dir.join("server.crt"));
    run(Command::new("openssl")
        .args(["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"])
        .args(["-subj", "/CN=localhost"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&csr))
    .expect("openssl: a CSR");
    let ext = dir.join("server.ext");
    std::fs::write(&ext, "subjectAltName=DNS:localhost\n").unwrap();
    run(Command::new("openssl")
        .args(["x509", "-req", "-days", "1", "-in"])
        .arg(&csr)
        .arg("-CA")
        .arg(ca_cert)
        .arg("-CAkey")
        .arg(ca_key)
        .args(["-CAcreateserial", "-extfile"])
        .arg(&ext)
        .arg("-out")
        .arg(&cert))
    .expect("openssl: sign the server certificate");
    (key, cert)
}

/// The dump script with the rendered environment; `root_cert` stands for
/// the mounted CA file (None: nothing mounted).
fn dump(pg: &Postgres, scratch: &Path, root_cert: Option<&Path>) -> Output {
    let spec = DatabaseSpec {
        host: "localhost".into(),
        port: pg.port.into(),
        name: "fhir".into(),
        credentials_secret: "patients-db".into(),
        ssl_mode: SslMode::VerifyFull,
        ca_secret: root_cert.map(|_| "patients-db-ca".into()),
    };
    let database = check_database(&spec).expect("a valid database");
    let mut command = Command::new("sh");
    command.args(["-c", DUMP_SCRIPT]).env_clear();
    for var in dump_env(&database) {
        if let Some(value) = var.value {
            command.env(&var.name, value);
        }
    }
    // The Secret's credentials, and the mount's path on this machine.
    command.env("PGUSER", "postgres").env("SCRATCH", scratch).env("HOME", scratch);
    if let Some(cert) = root_cert {
        command.env("PGSSLROOTCERT", cert);
    }
    command.env("PATH", format!("{}:/usr/bin:/bin", bin_dir().unwrap().display()));
    command.output().expect("run the dump script")
}

#[test]
fn the_dump_connects_with_verify_full_only_through_the_mounted_ca() {
    let pg = Postgres::start().expect("a real PostgreSQL (Debian's postgresql package)");
    pg.create_database("fhir").unwrap();
    pg.sql("fhir", "CREATE TABLE patient (id int); INSERT INTO patient VALUES (1), (2);").unwrap();
    let tls = pg.dir().join("tls");
    std::fs::create_dir(&tls).unwrap();
    let (ca_key, ca_cert) = ca(&tls, "database-ca");
    let (_, wrong_ca) = ca(&tls, "another-ca");
    let (key, cert) = server_cert(&tls, &ca_key, &ca_cert);
    hand_over(&tls).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    for setting in [
        format!("ssl_cert_file = '{}'", cert.display()),
        format!("ssl_key_file = '{}'", key.display()),
        "ssl = on".to_owned(),
    ] {
        pg.sql("postgres", &format!("ALTER SYSTEM SET {setting}")).unwrap();
    }
    pg.sql("postgres", "SELECT pg_reload_conf()").unwrap();
    // The reload is asynchronous: wait until new sessions see TLS on.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while pg.sql("postgres", "SHOW ssl").unwrap().trim() != "on" {
        assert!(std::time::Instant::now() < deadline, "PostgreSQL did not turn TLS on");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }

    let work = tempfile::tempdir().unwrap();
    let scratch = |name: &str| {
        let dir = work.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        dir
    };
    let good = scratch("good");
    let out = dump(&pg, &good, Some(&ca_cert));
    let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "verify-full with the mounted CA connects: {log}");
    assert_eq!(std::fs::read_to_string(good.join("counts.tsv")).unwrap(), "2\tpublic.patient\n");

    let out = dump(&pg, &scratch("none"), None);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "no CA: no connection");
    assert!(log.contains("root certificate file") || log.contains("certificate"), "{log}");

    let out = dump(&pg, &scratch("wrong"), Some(&wrong_ca));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "another CA: no connection");
    assert!(log.contains("certificate verify failed"), "{log}");
}
