//! The command line: parse, build the runtime, hand over to the library.

use std::process::ExitCode;

use secoda_agent::agent::{self, RunOptions};
use secoda_agent::cli::{self, Command};
use secoda_agent::config::{self, Sources};
use secoda_agent::constants::RUNTIME_WORKER_THREADS;
use secoda_agent::{doctor, exit, logging, status};

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
    let socket = || {
        cli.socket
            .clone()
            .unwrap_or_else(|| status::default_socket(cli.instance.as_deref()))
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
        Command::Status => ExitCode::from(status::command(&socket(), cli.json)),
        Command::Doctor => match runtime(tokio::runtime::Builder::new_current_thread()) {
            Ok(rt) => ExitCode::from(rt.block_on(doctor::run(&sources, &socket()))),
            Err(code) => code,
        },
        Command::Run => run(sources, cli.instance.clone(), log_level),
    }
}

fn runtime(mut builder: tokio::runtime::Builder) -> Result<tokio::runtime::Runtime, ExitCode> {
    builder.enable_all().build().map_err(|e| {
        eprintln!("secoda-agent: cannot start the runtime: {e}");
        ExitCode::from(exit::FAILURE)
    })
}

fn run(
    sources: Sources,
    instance: Option<String>,
    log_level: Option<log::LevelFilter>,
) -> ExitCode {
    // Before the runtime's threads exist: it reads (and clears) the environment.
    let handover = agent::Inherited::from_env();
    let cfg = match config::load(&sources) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("secoda-agent: configuration invalid, not starting:\n{e}");
            if let Some(h) = &handover {
                // An upgrade's new binary: the old process says why it keeps serving.
                h.refuse(&format!("the new version refuses the configuration: {e}"));
            }
            return ExitCode::from(exit::CONFIG);
        }
    };
    logging::init(log_level.unwrap_or(cfg.log.level), instance.as_deref());
    agent::prepare_process();
    for w in &cfg.warnings {
        log::warn!("{w}");
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(RUNTIME_WORKER_THREADS);
    let runtime = match runtime(builder) {
        Ok(r) => r,
        Err(code) => return code,
    };
    let opts = RunOptions {
        sources,
        instance,
        log_level,
        handover,
    };
    let result = runtime.block_on(agent::run(cfg, opts));
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
