//! Writing a [`Ruleset`] into the kernel with nftnl, in one atomic batch, and changing its
//! address sets in place.
//!
//! [`apply`] replaces our table in a single nf_tables transaction (add, delete, add again,
//! then its sets, chains and rules): the kernel either holds the whole new table or keeps
//! the old one, never a half-built one, and no packet passes in between. [`update_sets`]
//! adds and removes set elements, also in one transaction. Only the table `inet wardgate`
//! is ever named. [`table_exists`] reads the kernel's table list back.
//!
//! Unsafe code: this is the one module allowed it. nftnl (the crate DESIGN.md names) has no
//! safe wrapper for a dynamic set updated by a rule with a limit (the per-address flood
//! meter), nor for set flags and timeouts; those few calls into libnftnl are below, each
//! with what makes it sound.
//!
//! Tested by the system tests, which apply rulesets in network namespaces and compare the
//! kernel's listing with the one `nft -f` gives for the same rendered text.

#![allow(unsafe_code)]

use std::collections::{BTreeSet, HashMap, HashSet};
use std::ffi::CString;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ptr::NonNull;

use nftnl::expr::{
    Bitwise, Cmp, CmpOp, Expression, Icmpv6HeaderField, InterfaceName, Lookup, Meta, Payload,
    TransportHeaderField, Verdict,
};
use nftnl::nftnl_sys::{self as sys, libc};
use nftnl::set::{Set as NSet, SetKey};
use nftnl::{
    nft_expr, Batch, Chain as NChain, ChainType, FinalizedBatch, MsgType, Policy, ProtoFamily,
    Rule as NRule, Table,
};

use super::{CtState, Element, Family, Hook, Proto, Ruleset, Set, SetType, Stmt, TABLE};

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("nf_tables refused the change: {0} (the gateway needs root or CAP_NET_ADMIN, and a kernel with nf_tables)")]
    Kernel(#[from] std::io::Error),
    #[error("cannot express the ruleset for nf_tables: {0}")]
    Build(String),
}

/// An interface name as nft's `ifname` set key: IFNAMSIZ bytes, zero padded.
#[derive(Debug)]
struct Ifname([u8; 16]);

impl Ifname {
    fn new(name: &str) -> Result<Ifname, NetlinkError> {
        let mut b = [0u8; 16];
        if name.len() >= b.len() {
            return Err(NetlinkError::Build(format!(
                "interface name {name:?} too long"
            )));
        }
        b[..name.len()].copy_from_slice(name.as_bytes());
        Ok(Ifname(b))
    }
}

impl SetKey for Ifname {
    /// nft's TYPE_IFNAME.
    const TYPE: u32 = 41;
    const LEN: u32 = 16;

    fn data(&self) -> Box<[u8]> {
        Box::new(self.0)
    }
}

/// A named set of any of our key types.
enum AnySet<'a> {
    V4(NSet<'a, Ipv4Addr>),
    V6(NSet<'a, Ipv6Addr>),
    Ifname(NSet<'a, Ifname>),
}

impl AnySet<'_> {
    fn lookup(&self) -> Lookup {
        match self {
            AnySet::V4(s) => Lookup::new(s),
            AnySet::V6(s) => Lookup::new(s),
            AnySet::Ifname(s) => Lookup::new(s),
        }
    }

    fn add(&mut self, e: &Element) -> Result<(), NetlinkError> {
        match (self, e) {
            (AnySet::V4(s), Element::Addr(IpAddr::V4(a))) => s.add(a),
            (AnySet::V6(s), Element::Addr(IpAddr::V6(a))) => s.add(a),
            (AnySet::Ifname(s), Element::Ifname(i)) => s.add(&Ifname::new(i)?),
            (_, e) => {
                return Err(NetlinkError::Build(format!(
                    "element {e} in a set of another type"
                )))
            }
        }
        Ok(())
    }

    fn add_to(&self, batch: &mut Batch, msg: MsgType) {
        match self {
            AnySet::V4(s) => batch.add(s, msg),
            AnySet::V6(s) => batch.add(s, msg),
            AnySet::Ifname(s) => batch.add(s, msg),
        }
    }

    fn elements_to(&self, batch: &mut Batch, msg: MsgType) {
        match self {
            AnySet::V4(s) => batch.add_iter(s.elems_iter(), msg),
            AnySet::V6(s) => batch.add_iter(s.elems_iter(), msg),
            AnySet::Ifname(s) => batch.add_iter(s.elems_iter(), msg),
        }
    }

    fn as_ptr(&self) -> NonNull<sys::nftnl_set> {
        match self {
            AnySet::V4(s) => s.as_ptr(),
            AnySet::V6(s) => s.as_ptr(),
            AnySet::Ifname(s) => s.as_ptr(),
        }
    }
}

fn cstring(s: &str) -> Result<CString, NetlinkError> {
    CString::new(s).map_err(|_| NetlinkError::Build(format!("{s:?} holds a NUL byte")))
}

fn table_name() -> CString {
    // TABLE is a constant without NUL bytes.
    CString::new(TABLE).unwrap_or_default()
}

/// A set object for `set` (with its elements), bound to `table`.
fn new_set<'a>(table: &'a Table, set: &Set, id: u32) -> Result<AnySet<'a>, NetlinkError> {
    let name = cstring(&set.name)?;
    let mut s = match set.kind {
        SetType::Ipv4 => AnySet::V4(NSet::new_named(&name, id, table, ProtoFamily::Inet)),
        SetType::Ipv6 => AnySet::V6(NSet::new_named(&name, id, table, ProtoFamily::Inet)),
        SetType::Ifname => AnySet::Ifname(NSet::new_named(&name, id, table, ProtoFamily::Inet)),
    };
    if set.kind == SetType::Ifname {
        // nft reads a set's key byte order from its user data (TLV: type
        // NFTNL_UDATA_SET_KEYBYTEORDER = 0, length 4, value BYTEORDER_HOST_ENDIAN = 1); without
        // it, it prints interface names byte-reversed. Matching does not depend on it.
        let mut udata = vec![0u8, 4];
        udata.extend_from_slice(&1u32.to_ne_bytes());
        let ptr = s.as_ptr().as_ptr();
        // SAFETY: `ptr` is the live nftnl_set owned by `s`; libnftnl copies `udata`'s
        // `len` bytes and keeps no reference to it.
        unsafe {
            sys::nftnl_set_set_data(
                ptr,
                sys::NFTNL_SET_USERDATA as u16,
                udata.as_ptr().cast(),
                udata.len() as u32,
            );
        }
    }
    if let Some(timeout_s) = set.dynamic_timeout_s {
        let ptr = s.as_ptr().as_ptr();
        let flags = (libc::NFT_SET_TIMEOUT | libc::NFT_SET_EVAL) as u32;
        // SAFETY: `ptr` is the live nftnl_set owned by `s`; these setters copy plain
        // integers into it and take no ownership of anything.
        unsafe {
            sys::nftnl_set_set_u32(ptr, sys::NFTNL_SET_FLAGS as u16, flags);
            sys::nftnl_set_set_u64(
                ptr,
                sys::NFTNL_SET_TIMEOUT as u16,
                u64::from(timeout_s) * 1000,
            );
            sys::nftnl_set_set_u32(ptr, sys::NFTNL_SET_DESC_SIZE as u16, 65535);
        }
    }
    for e in &set.elements {
        s.add(e)?;
    }
    Ok(s)
}

/// `update @set { <key in reg 1> limit rate over RATE/second burst BURST packets }`.
struct MeterUpdate {
    set: CString,
    set_id: u32,
    rate: u32,
    burst: u32,
}

impl Expression for MeterUpdate {
    fn to_expr(&self, _rule: &NRule<'_>) -> NonNull<sys::nftnl_expr> {
        // SAFETY: both expressions are freshly allocated (checked non-null) and only given
        // plain integers and a NUL-terminated string that libnftnl copies. The limit
        // expression's ownership passes to the dynset expression (NFTNL_EXPR_DYNSET_EXPR
        // takes the pointer into its list and frees it with itself), and the dynset's
        // ownership passes to the caller, the rule, as the Expression trait requires.
        unsafe {
            let limit = sys::nftnl_expr_alloc(c"limit".as_ptr());
            let dynset = sys::nftnl_expr_alloc(c"dynset".as_ptr());
            let (Some(limit), Some(dynset)) = (NonNull::new(limit), NonNull::new(dynset)) else {
                // Out of memory inside libnftnl: nothing sensible is left to do.
                std::process::abort();
            };
            let l = limit.as_ptr();
            sys::nftnl_expr_set_u64(l, sys::NFTNL_EXPR_LIMIT_RATE as u16, u64::from(self.rate));
            sys::nftnl_expr_set_u64(l, sys::NFTNL_EXPR_LIMIT_UNIT as u16, 1);
            sys::nftnl_expr_set_u32(l, sys::NFTNL_EXPR_LIMIT_BURST as u16, self.burst);
            sys::nftnl_expr_set_u32(
                l,
                sys::NFTNL_EXPR_LIMIT_TYPE as u16,
                libc::NFT_LIMIT_PKTS as u32,
            );
            sys::nftnl_expr_set_u32(
                l,
                sys::NFTNL_EXPR_LIMIT_FLAGS as u16,
                libc::NFT_LIMIT_F_INV as u32,
            );
            let d = dynset.as_ptr();
            sys::nftnl_expr_set_u32(
                d,
                sys::NFTNL_EXPR_DYNSET_SREG_KEY as u16,
                libc::NFT_REG_1 as u32,
            );
            sys::nftnl_expr_set_u32(
                d,
                sys::NFTNL_EXPR_DYNSET_OP as u16,
                libc::NFT_DYNSET_OP_UPDATE as u32,
            );
            sys::nftnl_expr_set_str(d, sys::NFTNL_EXPR_DYNSET_SET_NAME as u16, self.set.as_ptr());
            sys::nftnl_expr_set_u32(d, sys::NFTNL_EXPR_DYNSET_SET_ID as u16, self.set_id);
            sys::nftnl_expr_set(
                d,
                sys::NFTNL_EXPR_DYNSET_EXPR as u16,
                l as *const std::ffi::c_void,
                0,
            );
            dynset
        }
    }
}

fn nfproto(rule: &mut NRule<'_>, f: Family) {
    rule.add_expr(&nft_expr!(meta nfproto));
    let proto = match f {
        Family::V4 => libc::NFPROTO_IPV4,
        Family::V6 => libc::NFPROTO_IPV6,
    };
    rule.add_expr(&nft_expr!(cmp == proto as u8));
}

fn l4proto(rule: &mut NRule<'_>, proto: u8) {
    rule.add_expr(&nft_expr!(meta l4proto));
    rule.add_expr(&nft_expr!(cmp == proto));
}

/// The network `n` matched against the address in register 1.
fn match_net(rule: &mut NRule<'_>, n: &ipnet::IpNet) {
    let whole = n.prefix_len() == n.max_prefix_len();
    match (n.addr(), n.netmask()) {
        (IpAddr::V4(a), IpAddr::V4(mask)) => {
            if !whole {
                rule.add_expr(&Bitwise::new(mask, Ipv4Addr::UNSPECIFIED));
            }
            rule.add_expr(&Cmp::new(CmpOp::Eq, a));
        }
        (IpAddr::V6(a), IpAddr::V6(mask)) => {
            if !whole {
                rule.add_expr(&Bitwise::new(mask, Ipv6Addr::UNSPECIFIED));
            }
            rule.add_expr(&Cmp::new(CmpOp::Eq, a));
        }
        // An IpNet's address and mask are of one family.
        _ => {}
    }
}

fn ifname(name: &str) -> Result<InterfaceName, NetlinkError> {
    Ok(InterfaceName::Exact(cstring(name)?))
}

fn encode(
    rule: &mut NRule<'_>,
    stmt: &Stmt,
    sets: &HashMap<String, AnySet<'_>>,
) -> Result<(), NetlinkError> {
    let set = |name: &str| {
        sets.get(name)
            .ok_or_else(|| NetlinkError::Build(format!("rule names unknown set {name}")))
    };
    match stmt {
        Stmt::IifnameInSet(s) => {
            rule.add_expr(&nft_expr!(meta iifname));
            rule.add_expr(&set(s)?.lookup());
        }
        Stmt::OifnameInSet(s) => {
            rule.add_expr(&nft_expr!(meta oifname));
            rule.add_expr(&set(s)?.lookup());
        }
        Stmt::Iifname(i) => {
            rule.add_expr(&nft_expr!(meta iifname));
            rule.add_expr(&Cmp::new(CmpOp::Eq, ifname(i)?));
        }
        Stmt::IifnameNot(i) => {
            rule.add_expr(&nft_expr!(meta iifname));
            rule.add_expr(&Cmp::new(CmpOp::Neq, ifname(i)?));
        }
        Stmt::Oifname(i) => {
            rule.add_expr(&nft_expr!(meta oifname));
            rule.add_expr(&Cmp::new(CmpOp::Eq, ifname(i)?));
        }
        Stmt::CtState(states) => {
            let bits = states.iter().fold(0u32, |acc, s| {
                acc | match s {
                    CtState::Invalid => 1,
                    CtState::Established => 2,
                    CtState::Related => 4,
                    CtState::New => 8,
                }
            });
            rule.add_expr(&nft_expr!(ct state));
            rule.add_expr(&nft_expr!(bitwise mask bits, xor 0u32));
            rule.add_expr(&nft_expr!(cmp != 0u32));
        }
        Stmt::SaddrInSet { family, set: s } => {
            nfproto(rule, *family);
            match family {
                Family::V4 => rule.add_expr(&nft_expr!(payload ipv4 saddr)),
                Family::V6 => rule.add_expr(&nft_expr!(payload ipv6 saddr)),
            }
            rule.add_expr(&set(s)?.lookup());
        }
        Stmt::Saddr(n) | Stmt::Daddr(n) => {
            let f = if n.addr().is_ipv4() {
                Family::V4
            } else {
                Family::V6
            };
            nfproto(rule, f);
            let src = matches!(stmt, Stmt::Saddr(_));
            match (f, src) {
                (Family::V4, true) => rule.add_expr(&nft_expr!(payload ipv4 saddr)),
                (Family::V4, false) => rule.add_expr(&nft_expr!(payload ipv4 daddr)),
                (Family::V6, true) => rule.add_expr(&nft_expr!(payload ipv6 saddr)),
                (Family::V6, false) => rule.add_expr(&nft_expr!(payload ipv6 daddr)),
            }
            match_net(rule, n);
        }
        Stmt::Dport { proto, port } => {
            match proto {
                Proto::Tcp => {
                    l4proto(rule, libc::IPPROTO_TCP as u8);
                    rule.add_expr(&nft_expr!(payload tcp dport));
                }
                Proto::Udp => {
                    l4proto(rule, libc::IPPROTO_UDP as u8);
                    rule.add_expr(&nft_expr!(payload udp dport));
                }
            }
            rule.add_expr(&nft_expr!(cmp == port.to_be()));
        }
        Stmt::Icmpv6Type(t) => {
            let code: u8 = match *t {
                "nd-router-solicit" => 133,
                "nd-neighbor-solicit" => 135,
                "nd-neighbor-advert" => 136,
                other => return Err(NetlinkError::Build(format!("icmpv6 type {other}"))),
            };
            l4proto(rule, libc::IPPROTO_ICMPV6 as u8);
            rule.add_expr(&Payload::Transport(TransportHeaderField::Icmpv6(
                Icmpv6HeaderField::Type,
            )));
            rule.add_expr(&nft_expr!(cmp == code));
        }
        Stmt::SkuidNot(uid) => {
            rule.add_expr(&Meta::SkUid);
            rule.add_expr(&nft_expr!(cmp != *uid));
        }
        Stmt::Meter {
            family,
            set: s,
            rate,
            burst,
        } => {
            nfproto(rule, *family);
            match family {
                Family::V4 => rule.add_expr(&nft_expr!(payload ipv4 saddr)),
                Family::V6 => rule.add_expr(&nft_expr!(payload ipv6 saddr)),
            }
            let target = set(s)?;
            let id = match target {
                AnySet::V4(x) => x.get_id(),
                AnySet::V6(x) => x.get_id(),
                AnySet::Ifname(x) => x.get_id(),
            };
            rule.add_expr(&MeterUpdate {
                set: cstring(s)?,
                set_id: id,
                rate: *rate,
                burst: *burst,
            });
        }
        Stmt::Counter => rule.add_expr(&nft_expr!(counter)),
        Stmt::Accept => rule.add_expr(&nft_expr!(verdict accept)),
        Stmt::Drop => rule.add_expr(&nft_expr!(verdict drop)),
        Stmt::Jump(chain) => rule.add_expr(&Verdict::Jump {
            chain: cstring(chain)?,
        }),
    }
    Ok(())
}

/// Replaces the table `inet wardgate` with `ruleset`, atomically.
pub fn apply(ruleset: &Ruleset) -> Result<(), NetlinkError> {
    let name = table_name();
    let table = Table::new(&name, ProtoFamily::Inet);
    let mut batch = Batch::new();
    // Adding first makes the delete valid whether or not the table exists.
    batch.add(&table, MsgType::Add);
    batch.add(&table, MsgType::Del);
    batch.add(&table, MsgType::Add);

    let mut sets = HashMap::new();
    for (i, s) in ruleset.sets.iter().enumerate() {
        let set = new_set(&table, s, u32::try_from(i).unwrap_or(u32::MAX))?;
        set.add_to(&mut batch, MsgType::Add);
        set.elements_to(&mut batch, MsgType::Add);
        sets.insert(s.name.clone(), set);
    }
    let mut chains = Vec::new();
    for c in &ruleset.chains {
        let cname = cstring(&c.name)?;
        let mut chain = NChain::new(&cname, &table);
        if let Some(h) = c.hook {
            let hook = match h {
                Hook::Input => nftnl::Hook::In,
                Hook::Output => nftnl::Hook::Out,
                Hook::Forward => nftnl::Hook::Forward,
            };
            chain.set_hook(hook, 0);
            chain.set_type(ChainType::Filter);
            chain.set_policy(Policy::Accept);
        }
        batch.add(&chain, MsgType::Add);
        chains.push(chain);
    }
    for (c, chain) in ruleset.chains.iter().zip(&chains) {
        for r in &c.rules {
            let mut rule = NRule::new(chain);
            for stmt in &r.stmts {
                encode(&mut rule, stmt, &sets)?;
            }
            rule.set_comment(cstring(&r.comment)?)
                .map_err(|e| NetlinkError::Build(e.to_owned()))?;
            batch.add(&rule, MsgType::Add);
        }
    }
    send(&batch.finalize())
}

/// Elements to add to and remove from one named set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetChange {
    pub set: String,
    pub add: Vec<Element>,
    pub remove: Vec<Element>,
}

/// Adds and removes elements of the named sets in one transaction.
pub fn update_sets(ruleset: &Ruleset, changes: &[SetChange]) -> Result<(), NetlinkError> {
    let name = table_name();
    let table = Table::new(&name, ProtoFamily::Inet);
    let mut batch = Batch::new();
    let mut any = false;
    for c in changes {
        let Some(def) = ruleset.sets.iter().find(|s| s.name == c.set) else {
            return Err(NetlinkError::Build(format!("no set {}", c.set)));
        };
        for (elements, msg) in [(&c.add, MsgType::Add), (&c.remove, MsgType::Del)] {
            if elements.is_empty() {
                continue;
            }
            let one = Set {
                elements: elements.clone(),
                ..def.clone()
            };
            new_set(&table, &one, 0)?.elements_to(&mut batch, msg);
            any = true;
        }
    }
    if !any {
        return Ok(());
    }
    send(&batch.finalize())
}

/// The element changes that turn `old`'s plain sets into `new`'s, or `None` when more than
/// set elements differ (chains, rules, set definitions): then the whole table is replaced.
pub fn set_changes(old: &Ruleset, new: &Ruleset) -> Option<Vec<SetChange>> {
    let shape = |r: &Ruleset| {
        let sets: Vec<Set> = r
            .sets
            .iter()
            .map(|s| Set {
                elements: Vec::new(),
                ..s.clone()
            })
            .collect();
        (sets, r.chains.clone())
    };
    if shape(old) != shape(new) {
        return None;
    }
    let mut changes = Vec::new();
    for (o, n) in old.sets.iter().zip(&new.sets) {
        if o.dynamic_timeout_s.is_some() {
            continue;
        }
        let before: BTreeSet<&Element> = o.elements.iter().collect();
        let after: BTreeSet<&Element> = n.elements.iter().collect();
        let add: Vec<Element> = after.difference(&before).map(|e| (*e).clone()).collect();
        let remove: Vec<Element> = before.difference(&after).map(|e| (*e).clone()).collect();
        if !add.is_empty() || !remove.is_empty() {
            changes.push(SetChange {
                set: n.name.clone(),
                add,
                remove,
            });
        }
    }
    Some(changes)
}

/// Whether the kernel holds our table (read back after applying).
pub fn table_exists() -> Result<bool, NetlinkError> {
    let socket = mnl::Socket::new(mnl::Bus::Netfilter)?;
    let seq = 1;
    let request = nftnl::table::get_tables_nlmsg(seq);
    // The request is one netlink message at the start of a larger buffer: its own length
    // (nlmsg_len, the first four bytes) says how much to send.
    let len = request
        .get(..4)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map_or(0, |b| u32::from_ne_bytes(b) as usize)
        .min(request.len());
    socket.send(&request[..len])?;
    let portid = socket.portid();
    let mut buffer = vec![0; nftnl::nft_nlmsg_maxsize() as usize];
    let mut tables: HashSet<CString> = HashSet::new();
    'dump: loop {
        for message in socket.recv(&mut buffer[..])? {
            let message = message?;
            match mnl::cb_run2(
                message,
                seq,
                portid,
                nftnl::table::get_tables_cb,
                &mut tables,
            )? {
                mnl::CbResult::Stop => break 'dump,
                mnl::CbResult::Ok => {}
            }
        }
    }
    Ok(tables
        .iter()
        .any(|t| t.as_c_str() == table_name().as_c_str()))
}

/// Sends a finalized batch and checks every acknowledgement.
fn send(batch: &FinalizedBatch) -> Result<(), NetlinkError> {
    let socket = mnl::Socket::new(mnl::Bus::Netfilter)?;
    let portid = socket.portid();
    socket.send_all(batch)?;
    let mut buffer = vec![0; nftnl::nft_nlmsg_maxsize() as usize];
    let mut expected = batch.sequence_numbers();
    while !expected.is_empty() {
        for message in socket.recv(&mut buffer[..])? {
            let message = message?;
            let Some(seq) = expected.next() else {
                return Err(NetlinkError::Build(
                    "an acknowledgement nobody asked for".into(),
                ));
            };
            mnl::cb_run(message, seq, portid)?;
        }
    }
    Ok(())
}
