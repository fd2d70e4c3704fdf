//! The `ibstream` command line: parses arguments and calls the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ibstream::config::Config;

// mimalloc: page parsing is allocation-heavy (JSON trees); measured 27% faster than glibc's
// allocator on the parse benchmark.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Returns the memory mimalloc keeps after big frees (the fingerprint tables outgrown during
/// the state restore: measured 101 → ~50 bytes of RSS per tracked entity at 1M entities).
fn release_free_memory() {
    // SAFETY: mi_collect only walks mimalloc's own free lists; it is safe to call any time.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

#[derive(Parser)]
#[command(
    name = "ibstream",
    version,
    about = "Streams a forex broker's CRM (Impact IB Reports API) into Kafka"
)]
struct Cli {
    /// Configuration file (TOML); environment variables IBSTREAM_* override it.
    #[arg(long, global = true, env = "IBSTREAM_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Stream the CRM into Kafka until SIGINT/SIGTERM.
    Run {
        /// Start although the state topic is empty while the data topics hold records (the
        /// state was lost): every record is read and emitted again.
        #[arg(long)]
        rebuild_state: bool,
    },
    /// Everything in one process: a simulated CRM, an in-process Kafka, the connector, and a
    /// live view of the events decoded back from the topics.
    Demo(Box<ibstream::demo::DemoArgs>),
    /// Validate the configuration, log in to the CRM and call every endpoint once, then check
    /// Kafka (and the Schema Registry when configured).
    Check {
        /// Only validate the configuration (no network) and print it as `run` would use it,
        /// secrets redacted; exit 2 if it is invalid.
        #[arg(long)]
        config_only: bool,
    },
    /// Serve a simulated CRM (for the demo, tests and benchmarks).
    Sim(Box<ibstream::sim::SimConfig>),
    /// Print, check or register the Avro event schemas.
    #[command(subcommand)]
    Schemas(SchemasCommand),
    /// Show or move the state (cursors, fingerprints) kept in the state topic.
    #[command(subcommand)]
    State(StateCommand),
    /// Read the events in the topics.
    #[command(subcommand)]
    Events(EventsCommand),
    /// Compare the data topics with what the CRM holds for a range of days (missing, extra
    /// and different keys; totals per day); exit 0 equal, 1 differs, 2 configuration error.
    Verify(VerifyArgs),
}

#[derive(Subcommand)]
enum EventsCommand {
    /// Print a topic's events decoded as JSON lines (read_committed, no consumer group),
    /// following it until Ctrl-C, --max or --until-end.
    Tail(ibstream::events::tail::TailArgs),
}

#[derive(clap::Args)]
struct VerifyArgs {
    /// First day (YYYY-MM-DD, the CRM's time zone).
    #[arg(long)]
    from: chrono::NaiveDate,
    /// Last day, inclusive.
    #[arg(long)]
    to: chrono::NaiveDate,
    /// Only this stream (repeatable; default: every enabled stream).
    #[arg(long = "stream")]
    streams: Vec<String>,
    /// Only this server tag's positions (repeatable).
    #[arg(long = "server-tag")]
    server_tags: Vec<String>,
    /// Report format.
    #[arg(long, value_enum, default_value_t)]
    format: ibstream::verify::Format,
    /// Send the missing and different records through the sink (refused while the
    /// instance runs).
    #[arg(long)]
    repair: bool,
    /// Repair although the instance's heartbeat is fresh.
    #[arg(long, requires = "repair")]
    force: bool,
}

#[derive(Subcommand)]
enum StateCommand {
    /// Show every cursor, the fingerprints kept per stream and the instance's heartbeat.
    Show {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Move a stream's cursors back (it reads again from there); refused while the instance
    /// runs.
    Reset {
        /// The stream: leads, customers, transactions, servers, positions.
        #[arg(long)]
        stream: String,
        /// Only this server tag (positions).
        #[arg(long)]
        server_tag: Option<String>,
        /// Read again from this day (YYYY-MM-DD).
        #[arg(
            long,
            conflicts_with = "from_start",
            required_unless_present = "from_start"
        )]
        to: Option<chrono::NaiveDate>,
        /// Forget the cursors: read again from the first day, as a first start.
        #[arg(long)]
        from_start: bool,
        /// Drop the fingerprints too: every record read again is emitted again (CREATED).
        #[arg(long)]
        resnapshot: bool,
        /// Reset although the instance's heartbeat is fresh.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum SchemasCommand {
    /// Print one event schema (LeadEvent, leads, …) or all of them, self-contained.
    Print {
        /// Event name or stream; all when absent.
        name: Option<String>,
    },
    /// Check every schema is BACKWARD compatible with its released snapshot.
    Check,
    /// Register every schema under `<topic>-value` in the configured Schema Registry.
    Register,
}

/// Exit code of a configuration error.
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    ibstream::telemetry::init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Sim(config) => match ibstream::sim::serve(*config).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            },
            Command::Schemas(command) => schemas(cli.config.as_deref(), command).await,
            Command::State(command) => state(cli.config.as_deref(), command).await,
            Command::Events(EventsCommand::Tail(args)) => {
                events_tail(cli.config.as_deref(), args).await
            }
            Command::Verify(args) => verify(cli.config.as_deref(), args).await,
            Command::Demo(args) => {
                let cancel = tokio_util::sync::CancellationToken::new();
                let on_signal = cancel.clone();
                tokio::spawn(async move {
                    ibstream::sim::shutdown_signal().await;
                    on_signal.cancel();
                });
                match ibstream::demo::run(*args, cli.config.as_deref(), cancel).await {
                    Ok(summary) => {
                        print!("{summary}");
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("error: {e:#}");
                        ExitCode::FAILURE
                    }
                }
            }
            Command::Run { rebuild_state } => {
                let config = match Config::load(cli.config.as_deref())
                    .and_then(|c| ibstream::run::validate(&c).map(|()| c))
                {
                    Ok(config) => config,
                    Err(e) => return config_error(e, cli.config.as_deref()),
                };
                run(config, rebuild_state).await
            }
            Command::Check { config_only: true } => {
                match Config::load(cli.config.as_deref())
                    .and_then(|c| ibstream::run::validate(&c).map(|()| c))
                {
                    Ok(config) => match toml::to_string_pretty(&config) {
                        Ok(text) => {
                            print!("{text}");
                            ExitCode::SUCCESS
                        }
                        Err(e) => {
                            eprintln!("error: cannot print the configuration: {e}");
                            ExitCode::FAILURE
                        }
                    },
                    Err(e) => {
                        eprintln!("{e}");
                        ExitCode::from(EXIT_CONFIG)
                    }
                }
            }
            Command::Check { config_only: false } => {
                let config = match load_config(cli.config.as_deref()) {
                    Ok(config) => config,
                    Err(code) => return code,
                };
                match ibstream::check::run(&config).await {
                    Ok(lines) => {
                        for line in &lines {
                            println!("{line}");
                        }
                        if lines.iter().all(|l| l.is_ok()) {
                            ExitCode::SUCCESS
                        } else {
                            ExitCode::FAILURE
                        }
                    }
                    Err(e) => {
                        eprintln!("{e}");
                        ExitCode::from(EXIT_CONFIG)
                    }
                }
            }
        }
    })
}

fn load_config(path: Option<&std::path::Path>) -> Result<Config, ExitCode> {
    let config = Config::load(path).and_then(|c| c.validate().map(|()| c));
    config.map_err(|e| config_error(e, path))
}

/// Prints a configuration error – and, when no file was given, how to give one – and
/// returns the exit code of configuration errors.
fn config_error(error: impl std::fmt::Display, path: Option<&std::path::Path>) -> ExitCode {
    eprintln!("{error}");
    if path.is_none() {
        eprintln!("no configuration file given: pass one with --config FILE or IBSTREAM_CONFIG=FILE (IBSTREAM_* variables set single keys, e.g. IBSTREAM_KAFKA__BOOTSTRAP_SERVERS)");
    }
    ExitCode::from(EXIT_CONFIG)
}

async fn events_tail(
    path: Option<&std::path::Path>,
    args: ibstream::events::tail::TailArgs,
) -> ExitCode {
    use ibstream::events::tail::TailError;
    let config = Config::load(path).map(|mut c| {
        if let Some(bootstrap) = &args.bootstrap_servers {
            c.kafka.bootstrap_servers = bootstrap.clone();
        }
        c
    });
    let config = match config.and_then(|c| {
        c.validate_without_crm()?;
        c.kafka.validate().map(|()| c)
    }) {
        Ok(config) => config,
        Err(e) => return config_error(e, path),
    };
    let cancel = tokio_util::sync::CancellationToken::new();
    let on_signal = cancel.clone();
    tokio::spawn(async move {
        ibstream::sim::shutdown_signal().await;
        on_signal.cancel();
    });
    let mut out = std::io::stdout();
    match ibstream::events::tail::run(&config, &args, &mut out, &cancel).await {
        Ok(_) => ExitCode::SUCCESS,
        Err(TailError::Config(e)) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn schemas(path: Option<&std::path::Path>, command: SchemasCommand) -> ExitCode {
    use ibstream::events::{EventType, Schemas};
    // print and check need only the namespace; the CRM section may be absent.
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if !ibstream::config::is_avro_namespace(&config.events.namespace) {
        eprintln!(
            "configuration error: `events.namespace` is not an Avro namespace: {:?}",
            config.events.namespace
        );
        return ExitCode::from(EXIT_CONFIG);
    }
    let schemas = match Schemas::load(&config.events.namespace) {
        Ok(schemas) => schemas,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match command {
        SchemasCommand::Print { name: Some(name) } => match EventType::parse(&name) {
            Some(event) => {
                println!("{}", schemas.get(event).json);
                ExitCode::SUCCESS
            }
            None => {
                eprintln!("error: unknown schema {name:?}; one of LeadEvent, CustomerEvent, TransactionEvent, ServerEvent, PositionEvent");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        SchemasCommand::Print { name: None } => {
            let all: Vec<&str> = schemas.all().iter().map(|s| s.json.as_str()).collect();
            println!("[\n{}\n]", all.join(",\n"));
            ExitCode::SUCCESS
        }
        SchemasCommand::Check => {
            let mut ok = true;
            for result in schemas.check_compatibility() {
                match result {
                    Ok(event) => println!("{:<18} ok (reads {}.v1)", event.name(), event.name()),
                    Err(e) => {
                        ok = false;
                        println!("{e}");
                    }
                }
            }
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        SchemasCommand::Register => {
            let Some(registry_config) = &config.schema_registry else {
                eprintln!(
                    "configuration error: `schema_registry.url` is required to register schemas"
                );
                return ExitCode::from(EXIT_CONFIG);
            };
            let registry = match ibstream::events::SchemaRegistry::build(registry_config) {
                Ok(registry) => registry,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let mut ok = true;
            for (event, subject) in ibstream::events::subjects(&config) {
                match registry.register(&subject, &schemas.get(event).json).await {
                    Ok(id) => println!("{subject:<28} id {id}"),
                    Err(e) => {
                        ok = false;
                        println!("{subject:<28} error: {e}");
                    }
                }
            }
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

async fn state(path: Option<&std::path::Path>, command: StateCommand) -> ExitCode {
    // Only Kafka is read: the CRM section may be absent.
    let config = match Config::load(path).and_then(|c| {
        c.validate_without_crm()?;
        c.kafka.validate().map(|()| c)
    }) {
        Ok(config) => config,
        Err(e) => return config_error(e, path),
    };
    use ibstream::state_tool::{ResetRequest, ResetTo};
    match command {
        StateCommand::Show { json } => match ibstream::state_tool::load(&config).await {
            Ok(state) => {
                let now = chrono::Utc::now();
                if json {
                    println!("{}", ibstream::state_tool::show_json(&state, now));
                } else {
                    print!(
                        "{}",
                        ibstream::state_tool::show_text(&state, &config.kafka.instance_id, now)
                    );
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        StateCommand::Reset {
            stream,
            server_tag,
            to,
            from_start,
            resnapshot,
            force,
        } => {
            let request = ResetRequest {
                stream,
                server_tag,
                to: match (to, from_start) {
                    (Some(day), _) => ResetTo::Day(day),
                    (None, _) => ResetTo::Start,
                },
                resnapshot,
                force,
            };
            match ibstream::state_tool::reset(&config, &request).await {
                Ok(lines) => {
                    for line in lines {
                        println!("{line}");
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn verify(path: Option<&std::path::Path>, args: VerifyArgs) -> ExitCode {
    use ibstream::verify::{Format, VerifyError, VerifyRequest};
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let request = VerifyRequest {
        from: args.from,
        to: args.to,
        streams: args.streams,
        server_tags: args.server_tags,
        repair: args.repair,
        force: args.force,
    };
    match ibstream::verify::run(config, request).await {
        Ok(report) => {
            match args.format {
                Format::Text => print!("{}", ibstream::verify::report::text(&report)),
                Format::Json => println!("{}", ibstream::verify::report::json(&report)),
                Format::Csv => print!("{}", ibstream::verify::report::csv(&report)),
            }
            ExitCode::from(ibstream::verify::exit_code(&report))
        }
        Err(e @ (VerifyError::Config(_) | VerifyError::Usage(_))) => {
            eprintln!("{e}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config, rebuild_state: bool) -> ExitCode {
    use tokio_util::sync::CancellationToken;
    ibstream::run::set_after_restore(release_free_memory);
    let cancel = CancellationToken::new();
    let on_signal = cancel.clone();
    tokio::spawn(async move {
        ibstream::sim::shutdown_signal().await;
        // Cancelled before it is said: whatever logs after this line saw the cancellation.
        on_signal.cancel();
        tracing::info!("shutdown requested");
    });
    let stats = ["leads", "customers", "transactions", "servers", "positions"]
        .into_iter()
        .map(|name| (name, std::sync::Arc::default()))
        .collect();
    let options = ibstream::run::RunOptions {
        rebuild_state,
        ..Default::default()
    };
    match ibstream::run::run_with(config, cancel.clone(), stats, &options).await {
        Ok(report) if report.stopped.is_empty() => ExitCode::SUCCESS,
        Ok(report) => {
            for (streams, reason) in ibstream::run::by_reason(&report.stopped) {
                eprintln!("error: {} stopped: {reason}", streams.join(", "));
            }
            ExitCode::FAILURE
        }
        Err(ibstream::run::RunError::Config(e)) => {
            eprintln!("{e}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
