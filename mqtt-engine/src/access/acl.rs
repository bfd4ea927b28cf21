//! STUB replaced by the acl branch.
#![allow(missing_docs, unused)]
#[derive(Debug, Default, Clone)]
pub struct Acl;
#[derive(Debug, Clone)]
pub struct AclError { pub line: usize, pub column: usize, pub message: String }
impl Acl {
    pub fn parse(_text: &str) -> Result<Acl, Vec<AclError>> { Ok(Acl) }
    pub fn may_read(&self, _u: Option<&str>, _c: &str, _t: &str) -> bool { true }
    pub fn may_write(&self, _u: Option<&str>, _c: &str, _t: &str) -> bool { true }
    pub fn may_subscribe(&self, _u: Option<&str>, _c: &str, _f: &str) -> bool { true }
    pub fn grants_anonymous_write(&self) -> bool { true }
    pub fn rule_count(&self) -> usize { 0 }
}
