//! `mg-spiffe`: a standard SPIFFE Workload API client, run inside pod (or
//! node) network namespaces by the end-to-end tests.
//!
//! It is the Rust `spiffe` crate used exactly as a workload would use it:
//! the endpoint comes from `SPIFFE_ENDPOINT_SOCKET`, nothing meshguard-
//! specific is sent. Every result is one JSON line on stdout
//! ([`meshguard_meshctl::sim::identity::Outcome`]):
//!
//! - `fetch`: one X.509 context (SVID and bundles); exit 0.
//! - `watch --count N`: the stream of X.509 contexts, one line per update,
//!   until N have arrived; exit 0. Rotations are the lines after the first.
//! - `jwt --audience A [--spiffe-id ID]`: a JWT-SVID (for ID, if asked).
//! - `validate --audience A --token T`: the Workload API's verdict on a token.
//!
//! A refusal by the Workload API (`PermissionDenied`, "no identity issued")
//! prints a `refused` line and exits 2; any other failure (no socket,
//! transport error, unparsable response, timeout) goes to stderr with exit
//! 1, so a test can never mistake a broken setup for a refusal.

#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use clap::{Parser, Subcommand};
use futures::StreamExt as _;
use meshguard_meshctl::sim::identity::{JwtReport, Outcome, SvidReport};
use spiffe::{WorkloadApiClient, WorkloadApiError, X509Context};
use x509_parser::prelude::{FromDer as _, X509Certificate};

#[derive(Parser)]
#[command(name = "mg-spiffe", about = "SPIFFE Workload API client for meshguard's tests (endpoint from SPIFFE_ENDPOINT_SOCKET)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Fetch the caller's X.509-SVID and bundle once.
    Fetch {
        #[arg(long, default_value_t = 10)]
        timeout: u64,
    },
    /// Follow the X.509-SVID stream and print every update (rotations).
    Watch {
        /// Exit 0 after this many updates (the first SVID counts).
        #[arg(long, default_value_t = 2)]
        count: usize,
        /// Give up (exit 1) after this many seconds.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// Fetch a JWT-SVID for an audience.
    Jwt {
        #[arg(long)]
        audience: String,
        /// Ask for this identity instead of the caller's default.
        #[arg(long)]
        spiffe_id: Option<String>,
        #[arg(long, default_value_t = 10)]
        timeout: u64,
    },
    /// Have the Workload API validate a JWT-SVID for an audience.
    Validate {
        #[arg(long)]
        audience: String,
        #[arg(long)]
        token: String,
        #[arg(long, default_value_t = 10)]
        timeout: u64,
    },
}

/// Exit status of a refusal by the Workload API.
const EXIT_REFUSED: u8 = 2;

/// One subcommand's work, run under its timeout.
type Job = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), Failure>>>>;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let (timeout, run): (u64, Job) = match Cli::parse().cmd {
        Cmd::Fetch { timeout } => (timeout, Box::pin(fetch())),
        Cmd::Watch { count, timeout } => (timeout, Box::pin(watch(count))),
        Cmd::Jwt { audience, spiffe_id, timeout } => (timeout, Box::pin(jwt(audience, spiffe_id))),
        Cmd::Validate { audience, token, timeout } => (timeout, Box::pin(validate(audience, token))),
    };
    match tokio::time::timeout(Duration::from_secs(timeout), run).await {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(Failure::Refused { reason, message })) => {
            print_line(&Outcome::Refused { reason, message });
            ExitCode::from(EXIT_REFUSED)
        }
        Ok(Err(Failure::Other(e))) => {
            eprintln!("mg-spiffe: {e:#}");
            ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("mg-spiffe: nothing (more) from the Workload API within {timeout}s");
            ExitCode::FAILURE
        }
    }
}

enum Failure {
    Refused { reason: String, message: String },
    Other(anyhow::Error),
}

impl From<WorkloadApiError> for Failure {
    fn from(e: WorkloadApiError) -> Self {
        match e {
            WorkloadApiError::NoIdentityIssued => Failure::Refused { reason: "no_identity_issued".into(), message: e.to_string() },
            WorkloadApiError::PermissionDenied(m) => Failure::Refused { reason: "permission_denied".into(), message: m },
            other => Failure::Other(anyhow::Error::new(other).context("Workload API call failed")),
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Other(e)
    }
}

async fn fetch() -> Result<(), Failure> {
    let client = WorkloadApiClient::connect_env().await?;
    let ctx = client.fetch_x509_context().await?;
    print_line(&Outcome::Svid(report(&ctx)?));
    Ok(())
}

async fn watch(count: usize) -> Result<(), Failure> {
    let client = WorkloadApiClient::connect_env().await?;
    let mut stream = client.stream_x509_contexts().await?;
    for _ in 0..count {
        match stream.next().await {
            Some(ctx) => print_line(&Outcome::Svid(report(&ctx?)?)),
            None => return Err(anyhow::anyhow!("the Workload API closed the stream").into()),
        }
    }
    Ok(())
}

async fn jwt(audience: String, spiffe_id: Option<String>) -> Result<(), Failure> {
    let id = spiffe_id.map(|s| s.parse::<spiffe::SpiffeId>()).transpose().map_err(|e| anyhow::anyhow!("--spiffe-id: {e}"))?;
    let client = WorkloadApiClient::connect_env().await?;
    let svid = client.fetch_jwt_svid(&[audience.as_str()], id.as_ref()).await?;
    print_line(&Outcome::Jwt(JwtReport {
        spiffe_id: svid.spiffe_id().to_string(),
        audience: svid.audience().to_vec(),
        expiry: svid.expiry().unix_timestamp(),
        token: svid.token().to_owned(),
    }));
    Ok(())
}

async fn validate(audience: String, token: String) -> Result<(), Failure> {
    let client = WorkloadApiClient::connect_env().await?;
    match client.validate_jwt_token(&audience, &token).await {
        Ok(svid) => print_line(&Outcome::Valid { spiffe_id: svid.spiffe_id().to_string() }),
        // The Workload API answers InvalidArgument for a token it rejects.
        Err(e) if e.is_invalid_argument() => print_line(&Outcome::Invalid { message: e.to_string() }),
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

fn print_line(o: &Outcome) {
    // One line per outcome, flushed: the reader may be waiting on it.
    println!("{}", serde_json::to_string(o).expect("outcome serializes"));
}

/// What the client received, with the fields a test checks.
fn report(ctx: &X509Context) -> anyhow::Result<SvidReport> {
    let received_at_ms = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as u64;
    let svid = ctx.default_svid().ok_or_else(|| anyhow::anyhow!("the X.509 context holds no SVID"))?;
    let leaf_der = svid.leaf().as_bytes();
    let (_, leaf) = X509Certificate::from_der(leaf_der).map_err(|e| anyhow::anyhow!("leaf certificate: {e}"))?;
    let bundle = ctx
        .bundle_set()
        .get(svid.spiffe_id().trust_domain())
        .map(|b| b.authorities().iter().map(|c| B64.encode(c.as_bytes())).collect())
        .unwrap_or_default();
    Ok(SvidReport {
        spiffe_id: svid.spiffe_id().to_string(),
        serial: hex::encode(leaf.raw_serial()),
        not_before: leaf.validity().not_before.timestamp(),
        not_after: leaf.validity().not_after.timestamp(),
        chain: svid.cert_chain().iter().map(|c| B64.encode(c.as_bytes())).collect(),
        bundle,
        key_matches_leaf: key_matches(svid.private_key().as_bytes(), &leaf),
        received_at_ms,
    })
}

/// Whether the private key the Workload API handed over belongs to the leaf
/// certificate (P-256, the only kind the CA signs).
fn key_matches(pkcs8: &[u8], leaf: &X509Certificate<'_>) -> bool {
    let rng = ring::rand::SystemRandom::new();
    match ring::signature::EcdsaKeyPair::from_pkcs8(&ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8, &rng) {
        Ok(pair) => {
            use ring::signature::KeyPair as _;
            pair.public_key().as_ref() == leaf.public_key().subject_public_key.data.as_ref()
        }
        Err(_) => false,
    }
}
