use std::process::ExitCode;

use secoda_agent::cli::{self, Command};
use secoda_agent::config::{self, Sources};
use secoda_agent::supervisor::{self, Control, Options};
use secoda_agent::{exit, logging, systemd};
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
        Command::Run => run(sources, log_level),
    }
}

fn run(sources: Sources, log_level: Option<log::LevelFilter>) -> ExitCode {
    let cfg = match config::load(&sources) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("secoda-agent: configuration invalid, not starting:\n{e}");
            return ExitCode::from(exit::CONFIG);
        }
    };
    logging::init(log_level.unwrap_or(cfg.log.level));
    raise_open_file_limit();
    for w in &cfg.warnings {
        log::warn!("{w}");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("secoda-agent: cannot start the runtime: {e}");
            return ExitCode::from(exit::FAILURE);
        }
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
        supervisor::run(cfg, Options { sources, log_level }, rx).await;
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
