//! One Modbus request, whatever the transport: which function it is, how
//! it is made on a tokio-modbus context, and how it is named in errors.

use tokio_modbus::client::{Context, Reader, Writer};

use super::plan::ReadRequest;
use super::registers::Table;
use super::tcp::Response;

/// A read of a planned request, or a write to one register (or coil).
#[derive(Debug, Clone)]
pub enum Op {
    /// Functions 1 to 4.
    Read(ReadRequest),
    /// Function 5 for bits, 6 for one register, 16 for several.
    Write(u16, Response),
    /// Function 22 (mask write register): one bit of a holding register,
    /// set or cleared by the device itself, so the other bits are never
    /// read and written back (a read-modify-write would race the PLC).
    WriteBit(u16, u8, bool),
}

impl Op {
    /// `reading holding 0..2` or `writing register 7`, for error messages.
    pub fn describe(&self) -> String {
        match self {
            Op::Read(r) => format!(
                "reading {} {}..{}",
                format!("{:?}", r.table).to_lowercase(),
                r.start,
                u32::from(r.start) + u32::from(r.count)
            ),
            Op::Write(register, _) => format!("writing register {register}"),
            Op::WriteBit(register, bit, _) => format!("writing bit {bit} of register {register}"),
        }
    }

    /// Makes the request; a write answers `None`.
    pub async fn perform(self, ctx: &mut Context) -> tokio_modbus::Result<Option<Response>> {
        let regs = |r: tokio_modbus::Result<Vec<u16>>| r.map(|x| x.map(|v| Some(Response::Registers(v))));
        let bits = |r: tokio_modbus::Result<Vec<bool>>| r.map(|x| x.map(|v| Some(Response::Bits(v))));
        let done = |r: tokio_modbus::Result<()>| r.map(|x| x.map(|()| None));
        match self {
            Op::Read(r) => match r.table {
                Table::Holding => regs(ctx.read_holding_registers(r.start, r.count).await),
                Table::Input => regs(ctx.read_input_registers(r.start, r.count).await),
                Table::Coil => bits(ctx.read_coils(r.start, r.count).await),
                Table::Discrete => bits(ctx.read_discrete_inputs(r.start, r.count).await),
            },
            Op::Write(register, Response::Bits(b)) => {
                done(ctx.write_single_coil(register, b.first().copied().unwrap_or(false)).await)
            }
            Op::Write(register, Response::Registers(r)) if r.len() == 1 => {
                done(ctx.write_single_register(register, r[0]).await)
            }
            Op::Write(register, Response::Registers(r)) => {
                done(ctx.write_multiple_registers(register, &r).await)
            }
            Op::WriteBit(register, bit, value) => {
                let mask = 1u16 << (bit & 15);
                // result = (current AND and_mask) OR (or_mask AND NOT and_mask)
                let or_mask = if value { mask } else { 0 };
                done(ctx.masked_write_register(register, !mask, or_mask).await)
            }
        }
    }
}
