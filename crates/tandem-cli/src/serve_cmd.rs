use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;
use std::sync::Arc;
use tandem_models::assets::Store;
use tandem_server::config::UpstreamKind;
use tandem_server::{Gateway, ServerConfig};

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// The gateway's TOML config (routes, upstreams, budgets).
    #[arg(long, default_value = "examples/local.toml")]
    config: PathBuf,
    /// Port to listen on (overrides the config's `server.listen` port).
    #[arg(long)]
    port: Option<u16>,
    /// Address to listen on, e.g. 0.0.0.0:8080 (overrides the config).
    #[arg(long)]
    listen: Option<String>,
    /// Validate the config and exit.
    #[arg(long)]
    check: bool,
}

pub fn run(a: ServeArgs) -> Result<()> {
    // Held to the end: dropping it writes out the lines still queued.
    let _log = init_logging()?;
    let cfg = ServerConfig::load(&a.config)?;
    cfg.check_environment(&a.config)?;
    if a.check {
        println!(
            "{}: {} upstreams, {} routes: ok",
            a.config.display(),
            cfg.upstreams.len(),
            cfg.routes.len()
        );
        return Ok(());
    }
    // In-process models come from the pinned assets; install the missing ones first.
    let ids: Vec<&str> = cfg
        .upstreams
        .iter()
        .filter(|u| u.cfg.kind == UpstreamKind::Gguf)
        .filter_map(|u| u.cfg.asset.as_deref())
        .collect();
    if !ids.is_empty() {
        crate::assets_cmd::ensure_installed(&Store::default_home(), &ids)?;
    }
    let mut listen = a.listen.unwrap_or_else(|| cfg.server.listen.clone());
    if let Some(p) = a.port {
        let host = listen.rsplit_once(':').map_or("127.0.0.1", |(h, _)| h);
        listen = format!("{host}:{p}");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        let gateway = Arc::new(Gateway::start(&cfg)?);
        let listener = tandem_server::listen::bind(&listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        let routes: Vec<&str> = gateway.routes().iter().map(|r| r.name()).collect();
        eprintln!(
            "tandem: serving routes {} on http://{}/v1 (Ctrl-C stops and saves what was learned)",
            routes.join(", "),
            listener.local_addr()?
        );
        tandem_server::serve(gateway, listener, cfg.server.clone(), shutdown())
            .await
            .context("server failed")
    })
}

async fn shutdown() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    eprintln!("tandem: stopping; saving learned state");
}

/// One JSON line per request on stderr (the access log, target `tandem::request`, level info);
/// `RUST_LOG` changes the level (`warn` turns the access log off, `debug` adds more). Lines are
/// written out in batches ([`crate::log_writer`]): request threads never write to stderr
/// themselves. The guard writes out what is buffered when dropped.
fn init_logging() -> Result<crate::log_writer::Guard> {
    use crate::log_writer::{spawn, FLUSH_EVERY, MAX_BUFFERED};
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (writer, guard) = spawn(std::io::stderr(), FLUSH_EVERY, MAX_BUFFERED)
        .context("cannot start the log writer thread")?;
    let counted = writer.clone();
    tandem_server::http::log::count_dropped_lines(move || counted.dropped());
    let _ = tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_writer(move || writer.clone())
        .try_init();
    Ok(guard)
}
