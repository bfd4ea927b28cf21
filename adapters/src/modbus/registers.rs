//! What a Modbus attribute is, and how its registers become a value (and
//! a value becomes registers, for writes).
//!
//! Multi-register values come in the four orders real meters use, named by
//! where the bytes of `0xAABBCCDD` land: ABCD (word order big, byte order
//! big, the Modbus default), CDAB (words swapped, common on energy meters),
//! BADC (bytes swapped in each word) and DCBA (both).

use std::sync::Arc;

use crate::Value;

/// A Modbus data table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    /// Read/write 16-bit registers (function 3; writes 6 and 16).
    Holding,
    /// Read-only 16-bit registers (function 4).
    Input,
    /// Read/write bits (function 1; writes 5 and 15).
    Coil,
    /// Read-only bits (function 2).
    Discrete,
}

impl Table {
    /// Whether the table holds bits rather than registers.
    pub fn is_bits(self) -> bool {
        matches!(self, Table::Coil | Table::Discrete)
    }
}

/// How the registers of an attribute are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataType {
    /// Unsigned 16-bit.
    U16,
    /// Signed 16-bit.
    I16,
    /// Unsigned 32-bit, two registers.
    U32,
    /// Signed 32-bit, two registers.
    I32,
    /// Unsigned 64-bit, four registers.
    U64,
    /// Signed 64-bit, four registers.
    I64,
    /// IEEE 754 single, two registers.
    F32,
    /// IEEE 754 double, four registers.
    F64,
    /// A coil or discrete input, or one bit of a register.
    Bool,
    /// Text, two characters per register, NULs and trailing spaces trimmed.
    String,
}

/// The order of the registers of a multi-register value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WordOrder {
    /// Most significant register first (ABCD), the Modbus convention.
    #[default]
    Big,
    /// Least significant register first (CDAB).
    Little,
}

/// The order of the two bytes within each register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ByteOrder {
    /// High byte first, the Modbus convention.
    #[default]
    Big,
    /// Low byte first (BADC, DCBA).
    Little,
}

/// One configured attribute of a Modbus device.
#[derive(Debug, Clone, PartialEq)]
pub struct AttributeSpec {
    /// Its name in readings.
    pub name: String,
    /// Its table.
    pub table: Table,
    /// Its first register (or bit), 0-based as on the wire.
    pub register: u16,
    /// How to read it.
    pub data_type: DataType,
    /// Register order of multi-register values.
    pub word_order: WordOrder,
    /// Byte order within registers.
    pub byte_order: ByteOrder,
    /// One bit (0-15) of a register, for `bool` from a register table.
    pub bit: Option<u8>,
    /// Registers of a `string`.
    pub count: u16,
    /// value = raw * scale + offset.
    pub scale: f64,
    /// See `scale`.
    pub offset: f64,
    /// Its unit, if any.
    pub unit: Option<Arc<str>>,
    /// Whether `{topic}/set/{name}` writes it.
    pub writable: bool,
    /// The lowest value a write may set (after scaling).
    pub min: Option<f64>,
    /// The highest value a write may set.
    pub max: Option<f64>,
}

impl AttributeSpec {
    /// An attribute with the defaults: big word and byte order, no scale,
    /// no unit, read only.
    pub fn new(name: impl Into<String>, table: Table, register: u16, data_type: DataType) -> Self {
        AttributeSpec {
            name: name.into(),
            table,
            register,
            data_type,
            word_order: WordOrder::Big,
            byte_order: ByteOrder::Big,
            bit: None,
            count: 0,
            scale: 1.0,
            offset: 0.0,
            unit: None,
            writable: false,
            min: None,
            max: None,
        }
    }

    /// How many registers (or bits) it spans.
    pub fn width(&self) -> u16 {
        match self.data_type {
            DataType::U16 | DataType::I16 | DataType::Bool => 1,
            DataType::U32 | DataType::I32 | DataType::F32 => 2,
            DataType::U64 | DataType::I64 | DataType::F64 => 4,
            DataType::String => self.count.max(1),
        }
    }

    /// Whether scale and offset change the raw value.
    fn scaled(&self) -> bool {
        self.scale != 1.0 || self.offset != 0.0
    }

    /// The value of registers (already the attribute's own slice).
    pub fn decode_registers(&self, regs: &[u16]) -> Option<Value> {
        if regs.len() < usize::from(self.width()) {
            return None;
        }
        if let Some(bit) = self.bit {
            return Some(Value::Bool(regs[0] >> bit & 1 == 1));
        }
        // The bytes, most significant first, whatever the device's order.
        let bytes = self.ordered_bytes(&regs[..usize::from(self.width())]);
        let raw = match self.data_type {
            DataType::U16 => Raw::Int(i64::from(u16::from_be_bytes([bytes[0], bytes[1]]))),
            DataType::I16 => Raw::Int(i64::from(i16::from_be_bytes([bytes[0], bytes[1]]))),
            DataType::U32 => Raw::Int(i64::from(u32::from_be_bytes(four(&bytes)))),
            DataType::I32 => Raw::Int(i64::from(i32::from_be_bytes(four(&bytes)))),
            DataType::F32 => Raw::Float(f64::from(f32::from_be_bytes(four(&bytes)))),
            DataType::U64 => {
                let v = u64::from_be_bytes(eight(&bytes));
                // Beyond i64, an unsigned counter is reported as a float.
                i64::try_from(v).map_or(Raw::Float(v as f64), Raw::Int)
            }
            DataType::I64 => Raw::Int(i64::from_be_bytes(eight(&bytes))),
            DataType::F64 => Raw::Float(f64::from_be_bytes(eight(&bytes))),
            DataType::Bool => return Some(Value::Bool(regs[0] != 0)),
            DataType::String => {
                let text: String = bytes.iter().map(|&b| b as char).collect();
                return Some(Value::Text(text.trim_end_matches(['\0', ' ']).to_owned()));
            }
        };
        Some(self.apply_scale(raw))
    }

    /// The value of a coil or discrete input.
    pub fn decode_bit(&self, bit: bool) -> Value {
        Value::Bool(bit)
    }

    fn apply_scale(&self, raw: Raw) -> Value {
        match raw {
            Raw::Int(i) if !self.scaled() => Value::Integer(i),
            Raw::Int(i) => Value::Float(round(i as f64 * self.scale + self.offset)),
            Raw::Float(f) if !self.scaled() => Value::Float(f),
            Raw::Float(f) => Value::Float(round(f * self.scale + self.offset)),
        }
    }

    /// Puts registers into most-significant-first byte order.
    fn ordered_bytes(&self, regs: &[u16]) -> Vec<u8> {
        let mut words: Vec<u16> = regs.to_vec();
        if self.word_order == WordOrder::Little && self.data_type != DataType::String {
            words.reverse();
        }
        words
            .iter()
            .flat_map(|w| {
                let [hi, lo] = w.to_be_bytes();
                if self.byte_order == ByteOrder::Little {
                    [lo, hi]
                } else {
                    [hi, lo]
                }
            })
            .collect()
    }

    /// The registers to write for `value` (scale and offset undone), or why not.
    pub fn encode_registers(&self, value: f64) -> Result<Vec<u16>, String> {
        if !value.is_finite() {
            return Err("not a finite number".into());
        }
        let raw = (value - self.offset) / self.scale;
        if !raw.is_finite() {
            return Err(format!("{value} cannot be written (out of range after scale and offset)"));
        }
        let int = |min: f64, max: f64| -> Result<i128, String> {
            let r = raw.round();
            if (raw - r).abs() > 1e-6 {
                return Err(format!("{value} is not a whole number of steps of {}", self.scale));
            }
            if r < min || r > max {
                return Err(format!("{value} is out of range for {:?}", self.data_type));
            }
            Ok(r as i128)
        };
        let bytes: Vec<u8> = match self.data_type {
            DataType::U16 => (int(0.0, 65535.0)? as u16).to_be_bytes().to_vec(),
            DataType::I16 => (int(-32768.0, 32767.0)? as i16).to_be_bytes().to_vec(),
            DataType::U32 => (int(0.0, 4_294_967_295.0)? as u32).to_be_bytes().to_vec(),
            DataType::I32 => (int(-2_147_483_648.0, 2_147_483_647.0)? as i32).to_be_bytes().to_vec(),
            DataType::U64 => (int(0.0, 1.8e19)? as u64).to_be_bytes().to_vec(),
            DataType::I64 => (int(-9.2e18, 9.2e18)? as i64).to_be_bytes().to_vec(),
            DataType::F32 if raw.abs() > f64::from(f32::MAX) => {
                return Err(format!("{value} is out of range for F32"))
            }
            DataType::F32 => (raw as f32).to_be_bytes().to_vec(),
            DataType::F64 => raw.to_be_bytes().to_vec(),
            DataType::Bool | DataType::String => return Err("not a numeric attribute".into()),
        };
        let mut words: Vec<u16> = bytes
            .chunks(2)
            .map(|b| {
                let (hi, lo) = if self.byte_order == ByteOrder::Little { (b[1], b[0]) } else { (b[0], b[1]) };
                u16::from_be_bytes([hi, lo])
            })
            .collect();
        if self.word_order == WordOrder::Little {
            words.reverse();
        }
        Ok(words)
    }
}

enum Raw {
    Int(i64),
    Float(f64),
}

fn four(b: &[u8]) -> [u8; 4] {
    [b[0], b[1], b[2], b[3]]
}

fn eight(b: &[u8]) -> [u8; 8] {
    [b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]
}

/// Scaled values are rounded to 12 significant digits: `2304 * 0.1` is
/// 230.4, not 230.40000000000003.
fn round(x: f64) -> f64 {
    if x == 0.0 || !x.is_finite() {
        return x;
    }
    let digits = 12 - x.abs().log10().ceil() as i32;
    let factor = 10f64.powi(digits.clamp(-300, 300));
    (x * factor).round() / factor
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(data_type: DataType, word_order: WordOrder, byte_order: ByteOrder) -> AttributeSpec {
        AttributeSpec { word_order, byte_order, ..AttributeSpec::new("x", Table::Holding, 0, data_type) }
    }

    /// 0xAABBCCDD in each of the four orders, as a device sends it.
    const ORDERS: [(WordOrder, ByteOrder, [u16; 2]); 4] = [
        (WordOrder::Big, ByteOrder::Big, [0xAABB, 0xCCDD]), // ABCD
        (WordOrder::Little, ByteOrder::Big, [0xCCDD, 0xAABB]), // CDAB
        (WordOrder::Big, ByteOrder::Little, [0xBBAA, 0xDDCC]), // BADC
        (WordOrder::Little, ByteOrder::Little, [0xDDCC, 0xBBAA]), // DCBA
    ];

    #[test]
    fn every_order_of_a_32_bit_value_decodes_to_the_same_number() {
        for (w, b, regs) in ORDERS {
            assert_eq!(
                spec(DataType::U32, w, b).decode_registers(&regs),
                Some(Value::Integer(0xAABB_CCDD)),
                "{w:?} {b:?}"
            );
        }
    }

    #[test]
    fn floats_in_every_order_and_doubles() {
        let bits = 230.4f32.to_bits();
        let (hi, lo) = ((bits >> 16) as u16, bits as u16);
        let swap = |w: u16| w.swap_bytes();
        let cases = [
            (WordOrder::Big, ByteOrder::Big, [hi, lo]),
            (WordOrder::Little, ByteOrder::Big, [lo, hi]),
            (WordOrder::Big, ByteOrder::Little, [swap(hi), swap(lo)]),
            (WordOrder::Little, ByteOrder::Little, [swap(lo), swap(hi)]),
        ];
        for (w, b, regs) in cases {
            assert_eq!(
                spec(DataType::F32, w, b).decode_registers(&regs),
                Some(Value::Float(f64::from(230.4f32)))
            );
        }
        let d = (-1234.5678f64).to_bits();
        let regs = [(d >> 48) as u16, (d >> 32) as u16, (d >> 16) as u16, d as u16];
        assert_eq!(
            spec(DataType::F64, WordOrder::Big, ByteOrder::Big).decode_registers(&regs),
            Some(Value::Float(-1234.5678))
        );
    }

    #[test]
    fn signed_types_and_64_bit_counters() {
        let s = |t| spec(t, WordOrder::Big, ByteOrder::Big);
        assert_eq!(s(DataType::I16).decode_registers(&[0xFFFE]), Some(Value::Integer(-2)));
        assert_eq!(s(DataType::U16).decode_registers(&[0xFFFE]), Some(Value::Integer(65534)));
        assert_eq!(s(DataType::I32).decode_registers(&[0xFFFF, 0xFFFF]), Some(Value::Integer(-1)));
        assert_eq!(s(DataType::U64).decode_registers(&[0, 0, 1, 0]), Some(Value::Integer(65536)));
        assert_eq!(
            s(DataType::I64).decode_registers(&[0xFFFF, 0xFFFF, 0xFFFF, 0xFFF6]),
            Some(Value::Integer(-10))
        );
        assert_eq!(s(DataType::U64).decode_registers(&[0xFFFF; 4]), Some(Value::Float(u64::MAX as f64)));
    }

    #[test]
    fn scale_and_offset_apply_without_float_noise() {
        let mut v = spec(DataType::U16, WordOrder::Big, ByteOrder::Big);
        v.scale = 0.1;
        assert_eq!(v.decode_registers(&[2304]), Some(Value::Float(230.4)));
        v.offset = -40.0;
        assert_eq!(v.decode_registers(&[650]), Some(Value::Float(25.0)));
    }

    #[test]
    fn a_bit_of_a_register_and_a_string() {
        let mut b = spec(DataType::Bool, WordOrder::Big, ByteOrder::Big);
        b.bit = Some(3);
        assert_eq!(b.decode_registers(&[0b1000]), Some(Value::Bool(true)));
        assert_eq!(b.decode_registers(&[0b0100]), Some(Value::Bool(false)));
        let mut s = spec(DataType::String, WordOrder::Big, ByteOrder::Big);
        s.count = 3;
        assert_eq!(s.decode_registers(&[0x5344, 0x4D36, 0x3330]), Some(Value::Text("SDM630".into())));
        s.count = 4;
        assert_eq!(s.decode_registers(&[0x5344, 0x4D00, 0, 0]), Some(Value::Text("SDM".into())));
    }

    #[test]
    fn writes_undo_scale_and_use_the_device_order() {
        let mut v = spec(DataType::U32, WordOrder::Little, ByteOrder::Big);
        v.scale = 0.1;
        assert_eq!(v.encode_registers(6553.7), Ok(vec![0x0001, 0x0001]));
        let i16 = spec(DataType::I16, WordOrder::Big, ByteOrder::Big);
        assert_eq!(i16.encode_registers(-2.0), Ok(vec![0xFFFE]));
        assert!(i16.encode_registers(40000.0).unwrap_err().contains("out of range"));
        assert!(i16.encode_registers(1.5).unwrap_err().contains("whole number"));
        assert!(i16.encode_registers(f64::NAN).is_err());
        // Found in review: a fractional step of a large value is refused,
        // not rounded; a value beyond f32 does not become infinity.
        let u32 = spec(DataType::U32, WordOrder::Big, ByteOrder::Big);
        assert!(u32.encode_registers(600_000.5).unwrap_err().contains("whole number"));
        assert!(spec(DataType::F32, WordOrder::Big, ByteOrder::Big)
            .encode_registers(1e39)
            .unwrap_err()
            .contains("out of range"));
        let mut nan_offset = i16.clone();
        nan_offset.offset = f64::NAN;
        assert!(nan_offset.encode_registers(1.0).is_err(), "a NaN offset must not write 0");
        for (w, b, regs) in ORDERS {
            assert_eq!(
                spec(DataType::U32, w, b).encode_registers(f64::from(0xAABB_CCDDu32)),
                Ok(regs.to_vec())
            );
        }
    }
}
