//! Request coalescing: the attributes of a device become as few read
//! requests as the protocol allows.
//!
//! Every round trip costs milliseconds (tens on RS-485 at 9600 baud), so
//! attributes close together in the same table are read in one request: a
//! request grows while the next attribute starts at most `max_gap`
//! registers after the current end and the whole stays within 125
//! registers (2,000 bits for coils and discrete inputs), the protocol's
//! limits for one read.

use super::registers::{AttributeSpec, Table};

/// The most registers one read may ask for (function 3 and 4).
pub const MAX_REGISTERS: u16 = 125;
/// The most bits one read may ask for (function 1 and 2).
pub const MAX_BITS: u16 = 2000;

/// One read request and the attributes it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadRequest {
    /// The table read.
    pub table: Table,
    /// The first register or bit.
    pub start: u16,
    /// How many.
    pub count: u16,
    /// Indexes of the attributes it covers.
    pub attributes: Vec<usize>,
}

/// Plans the reads for `attributes`, merging across gaps of at most `max_gap`.
pub fn plan(attributes: &[AttributeSpec], max_gap: u16) -> Vec<ReadRequest> {
    let mut order: Vec<usize> = (0..attributes.len()).collect();
    order.sort_by_key(|&i| (attributes[i].table, attributes[i].register));
    let mut requests: Vec<ReadRequest> = Vec::new();
    for i in order {
        let a = &attributes[i];
        let end = u32::from(a.register) + u32::from(a.width());
        let limit = u32::from(if a.table.is_bits() { MAX_BITS } else { MAX_REGISTERS });
        if let Some(last) = requests.last_mut() {
            let last_end = u32::from(last.start) + u32::from(last.count);
            let fits = last.table == a.table
                && u32::from(a.register) <= last_end + u32::from(max_gap)
                && end.max(last_end) - u32::from(last.start) <= limit;
            if fits {
                last.count = (end.max(last_end) - u32::from(last.start)) as u16;
                last.attributes.push(i);
                continue;
            }
        }
        requests.push(ReadRequest {
            table: a.table,
            start: a.register,
            count: a.width(),
            attributes: vec![i],
        });
    }
    requests
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::modbus::registers::DataType;

    fn attr(table: Table, register: u16, data_type: DataType) -> AttributeSpec {
        AttributeSpec::new(format!("r{register}"), table, register, data_type)
    }

    #[test]
    fn neighbours_merge_and_far_ones_do_not() {
        let attrs = [
            attr(Table::Input, 0, DataType::F32),
            attr(Table::Input, 2, DataType::F32),
            attr(Table::Input, 6, DataType::F32), // a gap of 2
            attr(Table::Input, 100, DataType::F32),
            attr(Table::Holding, 2, DataType::U16),
        ];
        let got = plan(&attrs, 4);
        let summary: Vec<_> = got.iter().map(|r| (r.table, r.start, r.count, r.attributes.len())).collect();
        assert_eq!(summary, [(Table::Holding, 2, 1, 1), (Table::Input, 0, 8, 3), (Table::Input, 100, 2, 1)]);
        // With no gap allowed, the gap splits the request.
        assert_eq!(plan(&attrs, 0).len(), 4);
    }

    #[test]
    fn forty_meter_attributes_take_two_requests_not_forty() {
        // An SDM630-like map: 40 f32 values at input registers 0, 2, 4...
        // except a jump after the 30th; one request each without coalescing.
        let attrs: Vec<_> = (0..40u16)
            .map(|i| attr(Table::Input, i * 2 + if i >= 30 { 140 } else { 0 }, DataType::F32))
            .collect();
        let requests = plan(&attrs, 10);
        assert_eq!(requests.len(), 2);
        assert!(requests.iter().all(|r| r.count <= MAX_REGISTERS));
    }

    #[test]
    fn a_request_never_exceeds_the_protocol_limit() {
        let attrs: Vec<_> = (0..100u16).map(|i| attr(Table::Holding, i * 2, DataType::U32)).collect();
        let requests = plan(&attrs, 100);
        assert!(requests.iter().all(|r| r.count <= MAX_REGISTERS), "{requests:?}");
        assert_eq!(requests.iter().map(|r| r.attributes.len()).sum::<usize>(), 100);
        let coils: Vec<_> = (0..3000u16).map(|i| attr(Table::Coil, i, DataType::Bool)).collect();
        assert_eq!(plan(&coils, 0).iter().map(|r| r.count).max(), Some(MAX_BITS));
    }
}
