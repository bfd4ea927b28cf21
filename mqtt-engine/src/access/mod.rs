//! Who may publish, receive and subscribe to what on the local broker.
pub mod acl;
