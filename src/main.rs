//! The `tokenwarden` command: parse the command line, call the library.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

use tokenwarden::catalog::{format_usd, Catalog};
use tokenwarden::config::{Config, ProcessEnv};
use tokenwarden::simulator::SimConfig;
use tokenwarden::tokens::request::{count_body, Endpoint};

#[derive(Parser)]
#[command(
    name = "tokenwarden",
    version,
    about = "An OpenAI-compatible gateway for the free-daily-tokens program"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Count the tokens of a text, or of a request body's prompt as the API bills it.
    Count(CountArgs),
    /// Run the gateway: from a configuration file, in front of OpenAI with only a key, or as a demo.
    ///
    /// Three ways to run it, and what each needs:
    ///
    /// - `--config FILE`, or a `tokenwarden.toml` in this folder: the orgs,
    ///   projects, keys, upstreams and the ledger the file names (see
    ///   `check-config`); `SIGHUP` reloads it.
    ///
    /// - no file, `OPENAI_API_KEY` set: one org and one project in front of
    ///   the OpenAI API, the ledger `tokenwarden.db` in this folder; a client
    ///   key and an admin token are printed on its first start and kept,
    ///   hashed, in the ledger.
    ///
    /// - `--demo`: nothing needed; in front of the built-in simulated
    ///   upstream, the ledger `tokenwarden-demo.db` in this folder, its keys
    ///   made and kept the same way.
    Serve {
        /// The configuration file (default: tokenwarden.toml if it exists).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Run in front of the built-in simulated upstream, with a demo org, project and key.
        #[arg(long)]
        demo: bool,
        /// The address to listen on when no configuration file sets it (default 127.0.0.1:8080).
        #[arg(long)]
        listen: Option<String>,
    },
    /// Run the simulated OpenAI-compatible upstream.
    Simulate {
        #[arg(long, default_value = "127.0.0.1:8081")]
        listen: String,
        /// Time to the first token, in milliseconds.
        #[arg(long, default_value_t = 0)]
        ttft_ms: u64,
        /// Delay between streamed tokens, in milliseconds.
        #[arg(long, default_value_t = 0)]
        token_ms: u64,
        /// Output tokens per call when the request allows that many.
        #[arg(long, default_value_t = 16)]
        output_tokens: u64,
    },
    /// Today's usage per org and group: free used and left, billed tokens, cost.
    Usage {
        #[arg(long, default_value = "tokenwarden.toml")]
        config: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Write an org's captured shared traffic as JSON lines to stdout
    /// (progress on stderr); `chat` is OpenAI's fine-tuning chat format.
    Export {
        #[arg(long, default_value = "tokenwarden.toml")]
        config: PathBuf,
        #[arg(long)]
        org: String,
        /// Only this project's calls.
        #[arg(long)]
        project: Option<String>,
        /// From this UTC day (YYYY-MM-DD), inclusive.
        #[arg(long)]
        since: Option<String>,
        /// To this UTC day (YYYY-MM-DD), inclusive.
        #[arg(long)]
        until: Option<String>,
        /// chat: {"messages": [...]} with the assistant's reply last; raw: each call as kept.
        #[arg(long, default_value = "chat")]
        format: String,
    },
    /// Check a JSON-lines file against OpenAI's chat fine-tuning format.
    CheckFinetune {
        /// The file (- for stdin).
        file: PathBuf,
    },
    /// Run a JSON-lines file of requests as one of a project's batches: the
    /// output and error lines to stdout, progress to stderr.
    ///
    /// The lines take the gateway's own road (metered, paced into the free
    /// allowance by the project's `batch_spend`), with no server; the batch
    /// is kept in the ledger. Interrupted, the same command goes on where it
    /// stopped; run after the batch ended, it prints the same output again.
    /// With a SQLite ledger, stop `serve` first (one process owns it).
    Batch {
        #[arg(long, default_value = "tokenwarden.toml")]
        config: PathBuf,
        /// The project, by name or id.
        #[arg(long)]
        project: String,
        /// The org, when projects of several orgs have that name.
        #[arg(long)]
        org: Option<String>,
        /// The lines' endpoint (default: the first line's url).
        #[arg(long)]
        endpoint: Option<String>,
        /// 24h, or longer for free-only work (48h, 7d, up to 30d).
        #[arg(long, default_value = "24h")]
        completion_window: String,
        /// The input: lines of {custom_id, method, url, body}.
        input: PathBuf,
    },
    /// Compare a day of the ledger with the upstream's own books (OpenAI's
    /// Usage and Costs APIs, read with each upstream's admin_key), per
    /// upstream project and model; exits 1 when they differ beyond the
    /// tolerance.
    Reconcile {
        #[arg(long, default_value = "tokenwarden.toml")]
        config: PathBuf,
        /// The UTC day (YYYY-MM-DD; default: yesterday, whose books have settled).
        #[arg(long)]
        day: Option<String>,
        /// Differences up to this percent of the larger count are agreement
        /// (and money up to a cent).
        #[arg(long, default_value_t = 1)]
        tolerance_percent: u32,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Validate a configuration file; exits non-zero with the key and line at fault.
    CheckConfig {
        #[arg(long, default_value = "tokenwarden.toml")]
        config: PathBuf,
    },
}

#[derive(clap::Args)]
struct CountArgs {
    /// The model whose encoding counts (and, for --request, the model when the body names none).
    #[arg(long, default_value = "gpt-4o")]
    model: String,
    /// Count a whole request body (a JSON file, or - for stdin) instead of a text.
    #[arg(long, value_name = "FILE", conflicts_with = "text")]
    request: Option<PathBuf>,
    /// The endpoint the body is for: chat, responses, completions or embeddings
    /// (guessed from the body's shape when absent).
    #[arg(long, requires = "request")]
    endpoint: Option<String>,
    /// Print the details as JSON: encoding, exact or bound, prompt, output cap, group, price.
    #[arg(long)]
    json: bool,
    /// The text to count, exactly as given; read from stdin when absent.
    text: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Count(args) => count(args),
        Command::CheckConfig { config } => check_config(&config),
        Command::Usage { config, json } => usage(&config, json),
        Command::Export {
            config,
            org,
            project,
            since,
            until,
            format,
        } => export(&config, org, project, since, until, &format),
        Command::CheckFinetune { file } => check_finetune(&file),
        Command::Reconcile {
            config,
            day,
            tolerance_percent,
            json,
        } => match reconcile(&config, day.as_deref(), tolerance_percent, json) {
            Ok(true) => return ExitCode::FAILURE,
            Ok(false) => Ok(()),
            Err(e) => Err(e),
        },
        Command::Batch {
            config,
            project,
            org,
            endpoint,
            completion_window,
            input,
        } => batch(
            &config,
            tokenwarden::cli::batch::Args {
                project,
                org,
                input,
                endpoint,
                completion_window,
            },
        ),
        Command::Serve {
            config,
            demo,
            listen,
        } => runtime(tracing::Level::INFO).and_then(|rt| {
            rt.block_on(tokenwarden::cli::serve(
                config.as_deref(),
                demo,
                listen.as_deref(),
            ))
        }),
        Command::Simulate {
            listen,
            ttft_ms,
            token_ms,
            output_tokens,
        } => runtime(tracing::Level::INFO).and_then(|rt| {
            let config = SimConfig {
                ttft: Duration::from_millis(ttft_ms),
                token_delay: Duration::from_millis(token_ms),
                output_tokens,
            };
            rt.block_on(tokenwarden::cli::simulate(&listen, config))
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tokenwarden: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The runtime, and logs to stderr at `default` or `TOKENWARDEN_LOG`.
fn runtime(default: tracing::Level) -> anyhow::Result<tokio::runtime::Runtime> {
    // TOKENWARDEN_LOG: error, warn, info, debug (adds a line per settled call) or trace.
    let level = std::env::var("TOKENWARDEN_LOG")
        .ok()
        .and_then(|v| v.parse::<tracing::Level>().ok())
        .unwrap_or(default);
    // Colours only for a terminal: a log file or journald gets plain text.
    let colours = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(colours)
        .with_target(false)
        .with_max_level(level)
        .init();
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn usage(path: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let config = Config::load(path, &ProcessEnv)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let today = tokenwarden::day::Day::from_unix(i64::try_from(now)?);
    let (rows, sharing) = read_runtime()?.block_on(async {
        let store = tokenwarden::store::open(&config.store, false).await?;
        let rows = tokenwarden::cli::usage_rows(&config, &*store, today).await?;
        let sharing = tokenwarden::cli::sharing_rows(&config, &*store, today).await?;
        anyhow::Ok((rows, sharing))
    })?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"day": today, "usage": rows, "sharing": sharing})
            )?
        );
    } else {
        println!("usage on {today} (UTC)");
        print!("{}", tokenwarden::cli::usage_table(&rows));
        println!();
        println!(
            "{:<16} {:>14} {:>14}",
            "org", "shared tokens", "private tokens"
        );
        for s in &sharing {
            println!(
                "{:<16} {:>14} {:>14}",
                s.org, s.shared_tokens, s.private_tokens
            );
        }
    }
    Ok(())
}

fn export(
    path: &std::path::Path,
    org: String,
    project: Option<String>,
    since: Option<String>,
    until: Option<String>,
    format: &str,
) -> anyhow::Result<()> {
    let config = Config::load(path, &ProcessEnv)?;
    let format = match format {
        "chat" => tokenwarden::cli::ExportFormat::Chat,
        "raw" => tokenwarden::cli::ExportFormat::Raw,
        other => anyhow::bail!("--format {other:?}: use chat or raw"),
    };
    let day =
        |flag: &str, value: Option<String>| -> anyhow::Result<Option<tokenwarden::day::Day>> {
            value
                .map(|v| {
                    tokenwarden::day::Day::parse(&v)
                        .ok_or_else(|| anyhow::anyhow!("{flag} {v:?}: use a date like 2026-11-24"))
                })
                .transpose()
        };
    let filter = tokenwarden::store::ExportFilter {
        org,
        project,
        since_ms: day("--since", since)?.map(|d| d.start_unix() * 1000),
        until_ms: day("--until", until)?.map(|d| (d.start_unix() + 86_400) * 1000),
    };
    let stdout = std::io::stdout().lock();
    let summary = tokenwarden::cli::export(&config, &filter, format, stdout, std::io::stderr())?;
    if summary.written == 0 {
        eprintln!(
            "export: nothing captured for org {} in that range",
            filter.org
        );
    }
    Ok(())
}

fn batch(path: &std::path::Path, args: tokenwarden::cli::batch::Args) -> anyhow::Result<()> {
    let config = Config::load(path, &ProcessEnv)?;
    // Warnings and errors only: progress has stderr.
    let summary = runtime(tracing::Level::WARN)?.block_on(tokenwarden::cli::batch::run(
        config,
        &args,
        std::io::stdout().lock(),
    ))?;
    let b = &summary.batch;
    eprintln!(
        "batch {} {}: {} lines, {} completed, {} failed; {} input and {} output tokens",
        b.id,
        b.status,
        b.request_counts.total,
        b.request_counts.completed,
        b.request_counts.failed,
        b.usage.input_tokens,
        b.usage.output_tokens
    );
    Ok(())
}

/// `tokenwarden reconcile`; whether the books differ.
fn reconcile(
    path: &std::path::Path,
    day: Option<&str>,
    tolerance_percent: u32,
    json: bool,
) -> anyhow::Result<bool> {
    let config = Config::load(path, &ProcessEnv)?;
    let day = match day {
        Some(d) => tokenwarden::day::Day::parse(d)
            .ok_or_else(|| anyhow::anyhow!("--day {d:?}: use a date like 2026-11-24"))?,
        None => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs();
            tokenwarden::day::Day(tokenwarden::day::Day::from_unix(i64::try_from(now)?).0 - 1)
        }
    };
    let report = read_runtime()?.block_on(async {
        let store = tokenwarden::store::open(&config.store, false).await?;
        tokenwarden::reconcile::reconcile(&config, &*store, day, tolerance_percent).await
    })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", tokenwarden::reconcile::table(&report));
    }
    Ok(report.differs)
}

fn check_finetune(path: &std::path::Path) -> anyhow::Result<()> {
    use std::io::BufRead;
    let reader: Box<dyn BufRead> = if path.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::io::BufReader::new(
            std::fs::File::open(path).with_context(|| path.display().to_string())?,
        ))
    };
    let (mut examples, mut bad) = (0u64, 0u64);
    for (i, line) in reader.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        examples += 1;
        let errors = match serde_json::from_str::<serde_json::Value>(&line) {
            Ok(value) => tokenwarden::finetune::errors(&value),
            Err(_) => vec!["invalid_json"],
        };
        if !errors.is_empty() {
            bad += 1;
            if bad <= 20 {
                eprintln!("line {}: {}", i + 1, errors.join(", "));
            }
        }
    }
    if examples == 0 {
        anyhow::bail!("{}: no examples", path.display());
    }
    if bad > 0 {
        anyhow::bail!("{bad} of {examples} examples are not in the chat fine-tuning format");
    }
    println!("{examples} examples, all in OpenAI's chat fine-tuning format");
    Ok(())
}

fn check_config(path: &std::path::Path) -> anyhow::Result<()> {
    let config = Config::load(path, &ProcessEnv)?;
    let projects: usize = config.orgs.iter().map(|o| o.projects.len()).sum();
    let keys: usize = config
        .orgs
        .iter()
        .flat_map(|o| &o.projects)
        .map(|p| p.keys.len())
        .sum();
    println!(
        "{}: ok ({} orgs, {projects} projects, {keys} keys, {} upstreams)",
        path.display(),
        config.orgs.len(),
        config.upstreams.len()
    );
    for warning in config.forward_warnings() {
        println!("warning: {warning}");
    }
    let has_changes = match &config.store {
        tokenwarden::config::StoreUrl::Postgres(pg) => {
            let version = read_runtime()?
                .block_on(tokenwarden::store::PgStore::schema_version(pg))
                .with_context(|| format!("connecting to {}", pg.shown))?;
            println!(
                "store: {} at schema version {version} (this tokenwarden writes {})",
                pg.shown,
                tokenwarden::store::postgres::schema::latest()
            );
            version >= 2
        }
        tokenwarden::config::StoreUrl::Sqlite(path) => path.exists(),
    };
    if has_changes {
        let changes = read_runtime()?.block_on(async {
            let store = tokenwarden::store::open(&config.store, false).await?;
            anyhow::Ok(store.changes(0).await?)
        })?;
        let changes: Vec<_> = changes
            .into_iter()
            .filter_map(tokenwarden::changes::Recorded::from_row)
            .collect();
        let differences = tokenwarden::changes::differences(&config, &changes);
        if !differences.is_empty() {
            let last = changes.last().map_or(0, |c| c.at_ms);
            println!(
                "changed at runtime ({} changes in the ledger, the last at {} UTC); these win over the file:",
                changes.len(),
                format_args!(
                    "{} {}",
                    tokenwarden::day::Day::from_unix(last.div_euclid(1000)),
                    tokenwarden::alerts::clock_time(last)
                )
            );
            for line in differences {
                println!("  {line}");
            }
        }
    }
    Ok(())
}

/// A small runtime for a command that reads the ledger (no log set-up).
fn read_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn read_stdin() -> anyhow::Result<Vec<u8>> {
    let mut input = Vec::new();
    std::io::stdin()
        .read_to_end(&mut input)
        .context("reading stdin")?;
    Ok(input)
}

fn count(args: CountArgs) -> anyhow::Result<()> {
    let catalog = Catalog::builtin()?;
    if let Some(path) = &args.request {
        let body = if path.as_os_str() == "-" {
            read_stdin()?
        } else {
            std::fs::read(path).with_context(|| format!("reading {}", path.display()))?
        };
        let endpoint = match args.endpoint.as_deref() {
            Some(name) => Some(Endpoint::parse(name).with_context(|| {
                format!("--endpoint {name:?}: expected chat, responses, completions or embeddings")
            })?),
            None => None,
        };
        let counted = count_body(&catalog, endpoint, &body, Some(&args.model)).map_err(|e| {
            let param = e
                .param()
                .map(|p| format!(" (param: {p})"))
                .unwrap_or_default();
            anyhow::anyhow!("{e}{param}")
        })?;
        if args.json {
            let details = serde_json::json!({
                "endpoint": counted.endpoint,
                "model": counted.model,
                "encoding": counted.encoding,
                "group": counted.group,
                "prompt_tokens": counted.prompt.tokens,
                "exactness": counted.prompt.exactness,
                "notes": counted.prompt.notes,
                "output_cap": counted.output_cap,
                "output_cap_source": counted.output_cap_source,
                "reservation": counted.reservation(),
                "prompt_list_price_usd": counted.prompt_list_price_usd(),
            });
            println!("{}", serde_json::to_string_pretty(&details)?);
        } else {
            println!("{}", counted.prompt.tokens);
            for note in &counted.prompt.notes {
                eprintln!("note: {note}");
            }
        }
        return Ok(());
    }

    let text = match args.text {
        Some(text) => text,
        None => String::from_utf8(read_stdin()?).context("stdin is not valid UTF-8")?,
    };
    let model = catalog.lookup(&args.model)?;
    let encoding = model.model.encoding;
    let tokens = encoding.count(&text);
    if args.json {
        let details = serde_json::json!({
            "model": args.model,
            "encoding": encoding,
            "group": model.group().map(|g| &g.name),
            "tokens": tokens,
            "exactness": "exact",
            "list_price_usd": format_usd(model.prices().cost(tokens, 0, 0)),
        });
        println!("{}", serde_json::to_string_pretty(&details)?);
    } else {
        println!("{tokens}");
    }
    Ok(())
}
