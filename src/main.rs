use std::process::ExitCode;

use secoda_agent::cli::{self, Command};
use secoda_agent::config::{self, Sources};
use secoda_agent::constants::{MALLOC_TRIM_THRESHOLD, RUNTIME_WORKER_THREADS};
use secoda_agent::supervisor::{self, Control, Options};
use secoda_agent::telemetry::Telemetry;
use secoda_agent::{doctor, exit, logging, metrics, status, systemd};
use tokio::signal::unix::{signal, SignalKind};

fn main() -> ExitCode {
    let cli = match cli::parse(std::env::args_os()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("secoda-agent: {e}\n{}", cli::USAGE);
            return ExitCode::from(exit::USAGE);
        }
    };
    let log_level = match cli
        .log_level
        .as_deref()
        .map(config::parse_level)
        .transpose()
    {
        Ok(l) => l,
        Err(e) => {
            eprintln!("secoda-agent: --log-level: {e}");
            return ExitCode::from(exit::USAGE);
        }
    };
    let sources = Sources {
        config: cli.config.clone(),
        env_file: cli.env_file.clone(),
        env: Sources::process_env(),
        instance: cli.instance.clone(),
        credentials: std::env::var_os("CREDENTIALS_DIRECTORY").map(Into::into),
        key_required: matches!(cli.command, Command::Run),
    };
    match cli.command {
        Command::Version => {
            println!("secoda-agent {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Help => {
            println!("{}", cli::USAGE);
            ExitCode::SUCCESS
        }
        Command::CheckConfig => match config::load(&sources) {
            Ok(cfg) => {
                for w in &cfg.warnings {
                    println!("warning: {w}");
                }
                println!("{}", cfg.summary());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("configuration invalid:\n{e}");
                ExitCode::from(exit::CONFIG)
            }
        },
        Command::Status => status(&cli),
        Command::Doctor => {
            let runtime = match runtime(tokio::runtime::Builder::new_current_thread()) {
                Ok(r) => r,
                Err(code) => return code,
            };
            let socket = status_socket(&cli);
            ExitCode::from(runtime.block_on(doctor::run(&sources, &socket)))
        }
        Command::Run => run(sources, cli.instance.clone(), log_level),
    }
}

fn runtime(mut builder: tokio::runtime::Builder) -> Result<tokio::runtime::Runtime, ExitCode> {
    builder.enable_all().build().map_err(|e| {
        eprintln!("secoda-agent: cannot start the runtime: {e}");
        ExitCode::from(exit::FAILURE)
    })
}

/// `--socket`, else the runtime directory's socket (see status.rs).
fn status_socket(cli: &cli::Cli) -> std::path::PathBuf {
    cli.socket.clone().unwrap_or_else(|| {
        status::socket_path(
            cli.instance.as_deref(),
            std::env::var("RUNTIME_DIRECTORY").ok().as_deref(),
        )
    })
}

fn status(cli: &cli::Cli) -> ExitCode {
    match status::query(&status_socket(cli)) {
        Ok(snapshot) => {
            if cli.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&snapshot).unwrap_or_default()
                );
            } else {
                print!("{}", status::render(&snapshot));
            }
            ExitCode::from(status::exit_code(&snapshot))
        }
        Err(status::QueryError::NotRunning(m)) => {
            eprintln!("{m}");
            ExitCode::from(status::exit::NOT_RUNNING)
        }
        Err(status::QueryError::NoPermission(m)) => {
            eprintln!("{m}");
            ExitCode::from(status::exit::NO_PERMISSION)
        }
        Err(status::QueryError::Garbled(m)) => {
            eprintln!("{m}");
            ExitCode::from(exit::FAILURE)
        }
    }
}

fn run(
    sources: Sources,
    instance: Option<String>,
    log_level: Option<log::LevelFilter>,
) -> ExitCode {
    let cfg = match config::load(&sources) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("secoda-agent: configuration invalid, not starting:\n{e}");
            return ExitCode::from(exit::CONFIG);
        }
    };
    logging::init(log_level.unwrap_or(cfg.log.level), instance.as_deref());
    raise_open_file_limit();
    tune_allocator();
    for w in &cfg.warnings {
        log::warn!("{w}");
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(RUNTIME_WORKER_THREADS);
    let runtime = match runtime(builder) {
        Ok(r) => r,
        Err(code) => return code,
    };
    let result = runtime.block_on(async {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        // Installed before the first connect, so an early SIGHUP reloads instead of killing.
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        tokio::spawn(async move {
            loop {
                let c = tokio::select! {
                    _ = term.recv() => Control::Shutdown,
                    _ = int.recv() => Control::Shutdown,
                    _ = hup.recv() => Control::Reload,
                };
                if tx.send(c).is_err() {
                    return;
                }
            }
        });
        if let Some(interval) = systemd::watchdog_interval() {
            tokio::spawn(systemd::watchdog(interval, systemd::watchdog_ping));
        }
        let telemetry = Telemetry::new(instance.clone(), supervisor::endpoints(&cfg));
        serve_status(&instance, &telemetry).await;
        if let Some(addr) = cfg.metrics.listen {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => {
                    log::info!("metrics at http://{addr}/metrics");
                    tokio::spawn(metrics::serve(l, telemetry.clone()));
                }
                Err(e) => log::error!(error_class = "metrics"; "[metrics] listen = \"{addr}\": cannot listen there: {e}; the tunnel runs without metrics"),
            }
        }
        let opts = Options {
            sources,
            log_level,
            telemetry,
        };
        supervisor::run(cfg, opts, rx).await;
        Ok::<(), std::io::Error>(())
    });
    // Channel tasks still running after a forced stop are dropped with the runtime.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    match result {
        Ok(()) => ExitCode::from(exit::OK),
        Err(e) => {
            eprintln!("secoda-agent: cannot install signal handlers: {e}");
            ExitCode::from(exit::FAILURE)
        }
    }
}

/// The status socket for `secoda-agent status`; without it the tunnel still runs.
async fn serve_status(instance: &Option<String>, telemetry: &std::sync::Arc<Telemetry>) {
    let path = status::socket_path(
        instance.as_deref(),
        std::env::var("RUNTIME_DIRECTORY").ok().as_deref(),
    );
    match status::bind(&path).await {
        Ok(l) => {
            tokio::spawn(status::serve(l, telemetry.clone()));
        }
        Err(e) => log::warn!(
            "status socket {} not available: {e}; `secoda-agent status` will not reach this agent",
            path.display()
        ),
    }
}

/// Keep freed heap memory for reuse instead of returning it to the kernel at once. Bulk data
/// passes through short-lived 32 KiB buffers; with glibc's default trim threshold (128 KiB)
/// the heap shrank and regrew with every burst, and the page faults of refilling it cost more
/// CPU than the copies themselves (4,000 to 150,000 faults per GiB in the benchmark, against
/// about 1,400 with this setting).
fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: mallopt only sets a tuning parameter of the allocator; called before any
        // other thread exists.
        let ok = unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD as i32) };
        if ok != 1 {
            log::debug!("could not set the allocator's trim threshold");
        }
    }
}

/// Each channel holds a socket to its target, so 1,000 channels need more than the usual soft
/// limit of 1,024 descriptors. Raise the soft limit to the hard one, as most daemons do.
fn raise_open_file_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass by valid pointer.
    let raised = unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0
        }
    };
    if !raised {
        log::debug!("could not raise the open-file limit; channels are limited by the current one");
    }
}
