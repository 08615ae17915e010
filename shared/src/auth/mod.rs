//! Who may connect to the edge broker and what they may do there, as Mosquitto decides it: password files
//! in `mosquitto_passwd`'s format ([`passwd`]) and `acl_file` topic ACLs ([`acl`]). Pure: the files' text
//! comes in, decisions come out; the front (`broker/src/front.rs`) asks, and the programs read and reload
//! the files.

pub mod acl;
pub mod passwd;
