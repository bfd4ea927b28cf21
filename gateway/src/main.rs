//! `fieldmq`: the gateway binary, and the only crate that knows both sides.
//!
//! It reads the config, builds adapters (from `adapters`) for the devices,
//! maps their readings to MQTT messages, and hands those to the engine
//! (`mqtt-engine`). The two libraries never see each other; this crate is
//! the glue, and owns the CLI, signals, systemd notification and shutdown.
//!
//! # Layout
//!
//! - `main.rs`: the CLI.
//! - `config/`: finding, parsing and checking the TOML config.
//! - `devices.rs`: which adapter serves which device `kind`.
//! - `mapping/`: readings to messages: topic templates, payloads, on-change.
//! - `runtime.rs`: the pipeline, devices -> mapping -> broker.
//! - `run.rs`: the service life cycle: start, reload, stop.
//! - `broker_state.rs`: the broker's snapshot in data_dir.
//! - `uplink.rs`: the store-and-forward buffer and the upstream bridges.
//! - `buffer_cli.rs`: `fieldmq buffer stats`.
//! - `commands.rs`: `check` and `test`.
//! - `writes.rs`: `{topic}/set/{attribute}` to device writes.
//! - `modbus_cli.rs`: `fieldmq modbus read`, for commissioning.
//! - `plan.rs`: the config described in words.
//! - `passwd.rs`: `fieldmq passwd`, the broker's users.
//! - `signals.rs`, `systemd.rs`, `logging.rs`: the process's surroundings.

mod broker_state;
mod buffer_cli;
mod commands;
mod config;
mod devices;
mod logging;
mod mapping;
mod modbus_cli;
mod passwd;
mod plan;
mod run;
mod runtime;
mod signals;
mod systemd;
mod uplink;
mod writes;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// IoT edge gateway: field devices to MQTT, with a local broker and
/// store-and-forward to the cloud.
#[derive(Parser)]
#[command(name = "fieldmq", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Run(ConfigArg),
    /// Validate a config and print what it would do; exit 0, or 2 with errors.
    Check(ConfigArg),
    /// Poll every device once and print the messages, publishing nothing;
    /// exit 0, or 1 if a device failed.
    Test(ConfigArg),
    /// The store-and-forward buffer.
    #[command(subcommand)]
    Buffer(BufferCommand),
    /// Commissioning tools for Modbus devices.
    #[command(subcommand)]
    Modbus(ModbusCommand),
    /// Add or change a broker user in a password file (or remove one with
    /// --delete); the password is asked twice, or read from stdin.
    Passwd(passwd::PasswdArgs),
}

#[derive(Subcommand)]
enum BufferCommand {
    /// Per upstream: rows waiting, oldest age, dropped, last delivery; and
    /// bytes on disk. Works while the gateway runs.
    Stats(buffer_cli::StatsArgs),
}

#[derive(Subcommand)]
enum ModbusCommand {
    /// Read raw registers and show them decoded in every word order.
    Read(modbus_cli::ReadArgs),
}

#[derive(Args)]
struct ConfigArg {
    /// The config file [default: $FIELDMQ_CONFIG, then /etc/fieldmq/fieldmq.toml,
    /// then the embedded default].
    #[arg(long, short, value_name = "FILE")]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run(ConfigArg { config: None })) {
        Command::Run(ConfigArg { config: path }) => match commands::load_or_report(path.as_deref()) {
            Ok(config) => {
                logging::init(config.log.as_deref());
                run::main(path, config)
            }
            Err(code) => code,
        },
        Command::Check(ConfigArg { config }) => commands::check(config.as_deref()),
        Command::Test(ConfigArg { config }) => {
            logging::init(Some("warn"));
            commands::test(config.as_deref())
        }
        Command::Buffer(BufferCommand::Stats(args)) => buffer_cli::stats(args),
        Command::Modbus(ModbusCommand::Read(args)) => modbus_cli::read(args),
        Command::Passwd(args) => passwd::passwd(args),
    }
}
