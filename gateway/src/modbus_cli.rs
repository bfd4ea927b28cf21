//! `fieldmq modbus read`: raw registers and their decoded values, for
//! commissioning. A person points it at a meter and sees which word order
//! gives a sensible voltage before writing the config.

use std::net::{SocketAddr, ToSocketAddrs};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use adapters::modbus::{
    AttributeSpec, ByteOrder, DataType, Link, Parity, ReadRequest, Response, RtuBus, SerialSettings, Table,
    TcpLink, WordOrder,
};
use clap::{Args, ValueEnum};

/// Arguments of `fieldmq modbus read`.
#[derive(Args, Debug)]
pub struct ReadArgs {
    /// A Modbus TCP server (or TCP-to-RTU gateway), HOST:PORT.
    #[arg(long, value_name = "HOST:PORT", required_unless_present = "rtu")]
    tcp: Option<String>,
    /// A serial port (Modbus RTU, 8 data bits, no parity, 1 stop bit).
    #[arg(long, value_name = "PORT", conflicts_with = "tcp")]
    rtu: Option<String>,
    /// The serial line's speed, with --rtu.
    #[arg(long, default_value_t = 9600)]
    baud: u32,
    /// The unit (slave) id.
    #[arg(long, default_value_t = 1)]
    unit: u8,
    /// The table.
    #[arg(long, value_enum, default_value_t = CliTable::Holding)]
    table: CliTable,
    /// The first register (0-based, as on the wire).
    #[arg(long)]
    register: u16,
    /// How many registers (or bits).
    #[arg(long, default_value_t = 1)]
    count: u16,
    /// Decode as this type, in every word and byte order.
    #[arg(long = "type", value_enum)]
    data_type: Option<CliType>,
    /// Mark the order you expect (ABCD, CDAB, BADC, DCBA) in the output.
    #[arg(long = "word-order", value_name = "ORDER")]
    order: Option<String>,
    /// How long to wait for the answer.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum CliTable {
    Holding,
    Input,
    Coil,
    Discrete,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum CliType {
    U16,
    I16,
    U32,
    I32,
    U64,
    I64,
    F32,
    F64,
    String,
}

enum Target {
    Tcp(SocketAddr),
    Rtu(SerialSettings),
}

const ORDERS: [(&str, WordOrder, ByteOrder); 4] = [
    ("ABCD", WordOrder::Big, ByteOrder::Big),
    ("CDAB", WordOrder::Little, ByteOrder::Big),
    ("BADC", WordOrder::Big, ByteOrder::Little),
    ("DCBA", WordOrder::Little, ByteOrder::Little),
];

/// Runs `fieldmq modbus read`; exit 0 with the answer, 1 if the device failed.
pub fn read(args: ReadArgs) -> ExitCode {
    let link = match (&args.tcp, &args.rtu) {
        (Some(target), _) => match target.to_socket_addrs().map(|mut a| a.next()) {
            Ok(Some(addr)) => Target::Tcp(addr),
            _ => {
                eprintln!("error: `{target}` is not a host:port");
                return ExitCode::from(2);
            }
        },
        (None, Some(port)) => Target::Rtu(SerialSettings {
            port: port.clone(),
            baud: args.baud,
            parity: Parity::None,
            data_bits: 8,
            stop_bits: 1,
        }),
        (None, None) => return ExitCode::from(2),
    };
    let table = match args.table {
        CliTable::Holding => Table::Holding,
        CliTable::Input => Table::Input,
        CliTable::Coil => Table::Coil,
        CliTable::Discrete => Table::Discrete,
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let request = ReadRequest { table, start: args.register, count: args.count, attributes: vec![] };
    let (answer, at) = runtime.block_on(async {
        match link {
            Target::Tcp(addr) => (
                Link::Tcp(Arc::new(TcpLink::new(addr))).read(args.unit, &request, args.timeout).await,
                addr.to_string(),
            ),
            Target::Rtu(serial) => {
                let at = format!("{} {} 8N1", serial.port, serial.baud);
                (Link::Rtu(RtuBus::spawn(serial)).read(args.unit, &request, args.timeout).await, at)
            }
        }
    });
    let end = u32::from(args.register) + u32::from(args.count);
    println!(
        "{} {}..{} from unit {} at {at}",
        format!("{table:?}").to_lowercase(),
        args.register,
        end,
        args.unit
    );
    match answer {
        Err(e) => {
            eprintln!("error: {}", e.error);
            ExitCode::FAILURE
        }
        Ok(Response::Bits(bits)) => {
            for (i, bit) in bits.iter().take(usize::from(args.count)).enumerate() {
                println!("{:>6}  {}", u32::from(args.register) + i as u32, bit);
            }
            ExitCode::SUCCESS
        }
        Ok(Response::Registers(regs)) => {
            println!("{:>8}  {:>6}  {:>6}  {:>6}", "register", "hex", "u16", "i16");
            for (i, r) in regs.iter().enumerate() {
                println!("{:>8}  0x{r:04X}  {r:>6}  {:>6}", u32::from(args.register) + i as u32, *r as i16);
            }
            print_decoded(&regs, args.register, args.data_type, args.order.as_deref());
            ExitCode::SUCCESS
        }
    }
}

/// Each value of `data_type` (or 32-bit values when none is given) in the
/// four orders, so the right one can be told by eye.
fn print_decoded(regs: &[u16], first: u16, data_type: Option<CliType>, expected: Option<&str>) {
    let data_type = match data_type {
        Some(CliType::U16) => DataType::U16,
        Some(CliType::I16) => DataType::I16,
        Some(CliType::U32) => DataType::U32,
        Some(CliType::I32) => DataType::I32,
        Some(CliType::U64) => DataType::U64,
        Some(CliType::I64) => DataType::I64,
        Some(CliType::F32) | None => DataType::F32,
        Some(CliType::F64) => DataType::F64,
        Some(CliType::String) => DataType::String,
    };
    let mut spec = AttributeSpec {
        count: regs.len() as u16,
        ..AttributeSpec::new("", Table::Holding, first, data_type)
    };
    let width = usize::from(spec.width());
    if regs.len() < width {
        return;
    }
    println!();
    let step = if data_type == DataType::String { regs.len() } else { width };
    for start in (0..=regs.len() - width).step_by(step.max(1)) {
        let mut line = format!("{:?} at {}:", data_type, u32::from(first) + start as u32).to_lowercase();
        for (name, word, byte) in ORDERS {
            spec.word_order = word;
            spec.byte_order = byte;
            let value = spec.decode_registers(&regs[start..]).map_or_else(|| "?".into(), |v| format!("{v}"));
            let mark = if expected.is_some_and(|e| e.eq_ignore_ascii_case(name)) { "*" } else { "" };
            line.push_str(&format!("  {name}{mark} {value}"));
        }
        println!("{line}");
    }
}
