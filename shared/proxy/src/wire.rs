//! Reading queries and upstream answers straight from their bytes, and writing the proxy's own
//! error answers from a query's bytes.
//!
//! Every packet the proxy handles crosses the hot path twice (the query in, the answer back), and
//! decoding each one whole into hickory's `Message` allocates a `Name` and an `RData` per record
//! only to throw nearly all of it away. The proxy needs little: a query's header, its first
//! question and whether it carries EDNS (RFC 6891); an answer's RCODE, TC bit, question and the
//! addresses along its CNAME chain. This module reads just that, in place, allocating only the
//! strings and addresses it hands back. Packets come from anyone on the network, so every read
//! is bounds-checked and anything malformed is a [`WireError`], never a panic.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::Range;

use crate::answer::{AnswerSummary, MAX_CHAIN, lowest_ttl, usable_ttl};

const HEADER_LEN: usize = 12;
/// QTYPE and QCLASS, after a question's name.
const QUESTION_FIXED_LEN: usize = 4;
/// TYPE, CLASS, TTL and RDLENGTH, after a record's owner name.
const RECORD_FIXED_LEN: usize = 10;
/// CNAME records an answer section may hold. Following the chain scans them once per step
/// (up to 16), and each comparison can walk a name of 127 labels: thousands of CNAMEs whose
/// owners all point at one name that differs from the chain's only in its last label once cost
/// some ten million label comparisons per answer. A real chain is a handful; DNAME-synthesized
/// ones and repeated owners stay far below this.
pub const MAX_CNAME_RECORDS: usize = 64;
/// Where a record's TTL starts, counted from the end of its owner name (after TYPE and CLASS).
const RECORD_TTL_AT: usize = 4;

/// More questions than this is no query a resolver sends; refusing it early bounds the work a
/// crafted packet can cause before it is answered FORMERR.
const MAX_QUESTIONS: u16 = 16;
/// RFC 1035 §3.1: a name, length octets included, is at most 255 octets.
const MAX_NAME_LEN: usize = 255;
/// Pointers only go backwards, so chains end anyway; the cap keeps a packet full of
/// pointer-to-pointer chains from costing thousands of jumps per name.
const MAX_POINTER_JUMPS: usize = 128;
/// RFC 6891 §6.2.5: smaller advertised payloads are treated as 512.
pub(crate) const MIN_UDP_PAYLOAD: u16 = 512;

const TYPE_A: u16 = 1;
const TYPE_CNAME: u16 = 5;
const TYPE_AAAA: u16 = 28;
const TYPE_OPT: u16 = 41;

const LABEL_KIND_MASK: u8 = 0xC0;
const LABEL_PLAIN: u8 = 0x00;
const LABEL_POINTER: u8 = 0xC0;

// The third and fourth header octets: QR, OPCODE, AA, TC, RD | RA, Z, AD, CD, RCODE.
const FLAG_QR: u8 = 0x80;
const FLAG_TC: u8 = 0x02;
const FLAG_RD: u8 = 0x01;
const FLAG_RA: u8 = 0x80;
const FLAG_CD: u8 = 0x10;
const OPCODE_SHIFT: u8 = 3;
const OPCODE_MASK: u8 = 0x0F;
const RCODE_MASK: u8 = 0x0F;
const RCODE_FORMERR: u8 = 1;
const RCODE_NOTIMP: u8 = 4;

/// The DO bit among the OPT record's flags, the low half of its TTL.
const EDNS_DNSSEC_OK: u32 = 0x8000;
/// Where the extended RCODE sits in the OPT record's TTL.
const EDNS_RCODE_SHIFT: u32 = 24;

/// Why a packet could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireError {
    /// Shorter than a header, or a name or record runs past the end.
    Short,
    /// A reserved label type, a pointer that does not point backwards (which also rules out
    /// loops), a pointer chain too long, or a name over 255 octets.
    BadName,
    /// A record's data does not fit its type: an A that is not 4 octets, an AAAA that is not
    /// 16, a CNAME whose name does not fill its data exactly, an OPT not owned by the root.
    BadRecord,
    /// The QR bit is set on what should be a query.
    NotAQuery,
    /// The QR bit is clear on what should be an answer.
    NotAResponse,
    /// The answer's first question is not the one that was asked.
    QuestionMismatch,
    /// The answer has no question to match against the query's.
    NoQuestion,
    /// More questions than any real query carries, or more CNAME records than any real
    /// answer (see [`MAX_CNAME_RECORDS`]).
    TooMany,
}

impl WireError {
    /// A short lowercase label, for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Short => "short",
            Self::BadName => "bad_name",
            Self::BadRecord => "bad_record",
            Self::NotAQuery => "not_a_query",
            Self::NotAResponse => "not_a_response",
            Self::QuestionMismatch => "question_mismatch",
            Self::NoQuestion => "no_question",
            Self::TooMany => "too_many",
        }
    }
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::error::Error for WireError {}

/// A query read from the wire: header fields, its first question, and whether it carries EDNS.
#[derive(Debug, Clone)]
pub struct Query<'a> {
    /// The whole packet, which [`error_response`] echoes the questions from.
    pub packet: &'a [u8],
    pub id: u16,
    /// The 4-bit OPCODE.
    pub opcode: u8,
    /// QDCOUNT as sent.
    pub question_count: u16,
    /// The first question's name as policy matching sees it: lowercase, fully qualified with a
    /// trailing dot, the root as "."; bytes other than letters, digits, '-', '_' and '*' escaped
    /// exactly as hickory's `Name::to_ascii` escapes them (`\c` for other printable ASCII,
    /// `\ooo` in octal for the rest), the presentation form the rest of Warden (policy, cache,
    /// CLI) uses. Empty when there is no question.
    pub qname: String,
    pub qtype: u16,
    pub qclass: u16,
    /// Byte range of the first question in `packet` (name, type and class), for echoing and
    /// for matching the answer against; never compressed, so it can be read on its own.
    pub question: Range<usize>,
    /// End offset of all QDCOUNT questions, where the answer section would start.
    pub questions_end: usize,
    /// The client's EDNS OPT record, if its additional section has one.
    pub edns: Option<Edns>,
}

/// What a client's OPT record asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Edns {
    /// The OPT record's CLASS as sent; RFC 6891 says to treat values below 512 as 512.
    pub max_payload: u16,
    pub dnssec_ok: bool,
}

/// What an upstream answer says, read without decoding it whole.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Answer {
    /// The 12-bit RCODE: the header's 4 bits, plus the OPT record's extended RCODE above them.
    pub rcode: u16,
    /// The TC bit: the answer did not fit and the client should retry over TCP.
    pub truncated: bool,
    /// A TC answer cut short inside a record (as some servers truncate): only its header and
    /// question were read, nothing in it is believed, and the client gets a clean TC answer of
    /// its own query instead (see [`truncated_response`]).
    pub cut_short: bool,
    pub summary: AnswerSummary,
    /// The longest TTL of any record but OPT (whose TTL field holds flags), as sent: a TTL cap
    /// shorter than it has the answer rewritten by [`cap_ttls`].
    pub longest_ttl: u32,
}

/// Reads a query. A query with no question is returned with an empty `qname` and an empty
/// `question` range at offset 12, so that the caller can still answer it FORMERR with the
/// client's EDNS settings; so is one with more than [`MAX_QUESTIONS`], its questions not read
/// (nor its EDNS, which follows them), so that it is answered FORMERR all the same.
pub fn parse_query(packet: &[u8]) -> Result<Query<'_>, WireError> {
    let header = Header::read(packet)?;
    if header.is_response() {
        return Err(WireError::NotAQuery);
    }
    let mut query = Query {
        packet,
        id: header.id,
        opcode: (header.flags[0] >> OPCODE_SHIFT) & OPCODE_MASK,
        question_count: header.question_count,
        qname: String::new(),
        qtype: 0,
        qclass: 0,
        question: HEADER_LEN..HEADER_LEN,
        questions_end: HEADER_LEN,
        edns: None,
    };
    if header.question_count > MAX_QUESTIONS {
        return Ok(query);
    }
    let mut position = HEADER_LEN;
    for index in 0..header.question_count {
        if index == 0 {
            let (qname, name_end) = read_name_text(packet, position)?;
            query.qname = qname;
            query.qtype = read_u16(packet, name_end)?;
            query.qclass = read_u16(packet, name_end + 2)?;
            position = name_end + QUESTION_FIXED_LEN;
            query.question = HEADER_LEN..position;
        } else {
            position = skip_question(packet, position)?;
        }
    }
    query.questions_end = position;
    for (index, record) in Records::new(packet, position, header.record_count()).enumerate() {
        let record = record?;
        if index >= header.additional_start() && record.kind == TYPE_OPT && query.edns.is_none() {
            query.edns = Some(Edns {
                max_payload: record.class,
                dnssec_ok: record.ttl & EDNS_DNSSEC_OK != 0,
            });
        }
    }
    Ok(query)
}

/// An answer to `query` carrying only `rcode` (12 bits: the low 4 go into the header, the high
/// 8 into our OPT record when there is one), built from the query's own bytes: its ID, opcode,
/// RD and CD bits and questions kept, RA set, and an OPT record when the client sent one
/// (RFC 6891 §7), advertising the client's own payload size and echoing its DO bit.
pub fn error_response(query: &Query<'_>, rcode: u16) -> Vec<u8> {
    let questions = query
        .packet
        .get(HEADER_LEN..query.questions_end)
        .unwrap_or_default();
    let question_count = if questions.is_empty() {
        0
    } else {
        query.question_count
    };
    let copied = |at: usize, flag: u8| query.packet.get(at).map_or(0, |byte| byte & flag);
    let [_, rcode_low] = rcode.to_be_bytes();
    let [_, rcode_extended] = (rcode >> 4).to_be_bytes();
    let flags = [
        FLAG_QR | ((query.opcode & OPCODE_MASK) << OPCODE_SHIFT) | copied(2, FLAG_RD),
        FLAG_RA | copied(3, FLAG_CD) | (rcode_low & RCODE_MASK),
    ];
    let additional_count = u16::from(query.edns.is_some());

    let mut response = Vec::with_capacity(HEADER_LEN + questions.len() + 1 + RECORD_FIXED_LEN);
    response.extend_from_slice(&query.id.to_be_bytes());
    response.extend_from_slice(&flags);
    for count in [question_count, 0, 0, additional_count] {
        response.extend_from_slice(&count.to_be_bytes());
    }
    response.extend_from_slice(questions);
    if let Some(edns) = query.edns {
        let mut ttl = u32::from(rcode_extended) << EDNS_RCODE_SHIFT;
        if edns.dnssec_ok {
            ttl |= EDNS_DNSSEC_OK;
        }
        response.push(0);
        response.extend_from_slice(&TYPE_OPT.to_be_bytes());
        response.extend_from_slice(&edns.max_payload.max(MIN_UDP_PAYLOAD).to_be_bytes());
        response.extend_from_slice(&ttl.to_be_bytes());
        response.extend_from_slice(&0u16.to_be_bytes());
    }
    response
}

/// The most a UDP answer to `query` may carry: 512 bytes, or the payload size of the client's
/// OPT record (RFC 6891 treats less than 512 as 512).
pub fn udp_limit(query: &Query<'_>) -> usize {
    usize::from(query.edns.map_or(MIN_UDP_PAYLOAD, |edns| {
        edns.max_payload.max(MIN_UDP_PAYLOAD)
    }))
}

/// An empty answer to `query` with the TC bit set, built as [`error_response`] builds its own:
/// the client asks again over TCP (RFC 1035 §4.2.1), as it would had the server truncated.
pub fn truncated_response(query: &Query<'_>) -> Vec<u8> {
    let mut response = error_response(query, u16::from(hickory_proto::op::ResponseCode::NoError));
    if let Some(flags) = response.get_mut(2) {
        *flags |= FLAG_TC;
    }
    response
}

/// What [`parse_answer`] refused, read again as a TC answer cut short inside a record: a
/// response with the TC bit whose first question is the asked one. None for anything else,
/// which stays refused. Its records are not read, so none is believed: the client asks again
/// over TCP, rather than waiting for a SERVFAIL at the timeout.
pub fn cut_short_answer(packet: &[u8], asked: &[u8]) -> Option<Answer> {
    let header = Header::read(packet).ok()?;
    if !header.is_response() || header.flags[0] & FLAG_TC == 0 || header.question_count == 0 {
        return None;
    }
    asked_question_end(packet, asked).ok()?;
    Some(Answer {
        rcode: u16::from(header.flags[1] & RCODE_MASK),
        truncated: true,
        cut_short: true,
        ..Answer::default()
    })
}

/// Reads an upstream answer to the question at `asked` (the bytes of a query's question, i.e.
/// `&query.packet[query.question.clone()]`). The answer must be a response whose first question
/// is the asked one (names compared case-insensitively), and every record of every section must
/// parse, so that a mangled or spoofed answer is refused whole rather than half-believed. The
/// summary follows the rules of `crate::answer` (its tests' reference reads them the same way).
pub fn parse_answer(packet: &[u8], asked: &[u8]) -> Result<Answer, WireError> {
    let header = Header::read(packet)?;
    if !header.is_response() {
        return Err(WireError::NotAResponse);
    }
    if header.question_count > MAX_QUESTIONS {
        return Err(WireError::TooMany);
    }
    let answers_start = if header.question_count == 0 {
        // A server that does not understand a query (EDNS, say) may answer FORMERR or NOTIMP
        // without echoing it (RFC 6891 §7): the client needs that error to fall back, not a
        // SERVFAIL at the timeout. It carries no records to believe, so the ID and the server
        // are match enough.
        let rcode = header.flags[1] & RCODE_MASK;
        let bare_error = matches!(rcode, RCODE_FORMERR | RCODE_NOTIMP)
            && header.answer_count == 0
            && header.authority_count == 0;
        if !bare_error {
            return Err(WireError::NoQuestion);
        }
        HEADER_LEN
    } else {
        let mut position = asked_question_end(packet, asked)?;
        for _ in 1..header.question_count {
            position = skip_question(packet, position)?;
        }
        position
    };

    let mut rcode = u16::from(header.flags[1] & RCODE_MASK);
    let mut seen_opt = false;
    let mut longest_ttl = 0;
    // Gathered in this pass, so that following the chain reads no record again: each step
    // used to walk the whole answer section, names and all (a crafted answer of thousands of
    // records with long compression chains cost that up to MAX_CHAIN + 1 times). Most answers
    // have none, and allocate nothing here.
    let mut cnames: Vec<Record> = Vec::new();
    for (index, record) in Records::new(packet, answers_start, header.record_count()).enumerate() {
        let record = record?;
        if record.kind == TYPE_CNAME && index < usize::from(header.answer_count) {
            if cnames.len() == MAX_CNAME_RECORDS {
                return Err(WireError::TooMany);
            }
            cnames.push(record.clone());
        }
        if record.kind != TYPE_OPT {
            longest_ttl = longest_ttl.max(record.ttl);
        } else if index >= header.additional_start() && !seen_opt {
            seen_opt = true;
            let [extended, ..] = record.ttl.to_be_bytes();
            rcode |= u16::from(extended) << 4;
        }
    }

    let answers = Records::new(packet, answers_start, usize::from(header.answer_count));
    Ok(Answer {
        rcode,
        truncated: header.flags[0] & FLAG_TC != 0,
        cut_short: false,
        summary: summarize(answers, &cnames)?,
        longest_ttl,
    })
}

/// Lowers every record's TTL to at most `max_ttl`, in place, in all three sections (OPT's
/// TTL field holds flags and is left alone); a TTL of 2^31 or more becomes 0, as the cache
/// reads it. For an answer [`parse_answer`] accepted: what the cache records and what the
/// client is told then agree, so no client uses an address past its allow entries.
pub fn cap_ttls(packet: &mut [u8], max_ttl: u32) -> Result<(), WireError> {
    let header = Header::read(packet)?;
    let mut position = HEADER_LEN;
    for _ in 0..header.question_count {
        position = skip_question(packet, position)?;
    }
    for _ in 0..header.record_count() {
        let record = read_record(packet, position)?;
        position = record.data.end;
        let capped = usable_ttl(record.ttl).min(max_ttl);
        if record.kind == TYPE_OPT || capped == record.ttl {
            continue;
        }
        let ttl_at = record.data.start - RECORD_FIXED_LEN + RECORD_TTL_AT;
        packet
            .get_mut(ttl_at..ttl_at + 4)
            .ok_or(WireError::Short)?
            .copy_from_slice(&capped.to_be_bytes());
    }
    Ok(())
}

/// Where the answer's first question (its name at offset 12) ends, if it is the asked one;
/// `QuestionMismatch` if not. An `asked` that cannot be read matches nothing.
fn asked_question_end(packet: &[u8], asked: &[u8]) -> Result<usize, WireError> {
    let name_end = skip_name(packet, HEADER_LEN)?;
    let end = name_end + QUESTION_FIXED_LEN;
    let type_and_class = packet.get(name_end..end).ok_or(WireError::Short)?;
    let Ok(asked_name_end) = skip_name(asked, 0) else {
        return Err(WireError::QuestionMismatch);
    };
    let same = asked.get(asked_name_end..asked_name_end + QUESTION_FIXED_LEN)
        == Some(type_and_class)
        && names_equal(packet, HEADER_LEN, asked, 0).unwrap_or(false);
    if same {
        Ok(end)
    } else {
        Err(WireError::QuestionMismatch)
    }
}

/// Follows the question's name through the answer section's CNAMEs (`cnames`, in answer
/// order), by the rules of `crate::answer`. The chain's current name is kept as an offset into
/// the packet and compared in place, so only the results are allocated.
fn summarize(answers: Records<'_>, cnames: &[Record]) -> Result<AnswerSummary, WireError> {
    let packet = answers.packet;
    let mut summary = AnswerSummary::default();
    let mut current = HEADER_LEN;
    let mut ttl = None;
    for _ in 0..MAX_CHAIN {
        let Some(cname) = first_cname_of(packet, cnames, current)? else {
            break;
        };
        ttl = lowest_ttl(ttl, cname.ttl);
        let (target, _) = read_name_text(packet, cname.data.start)?;
        summary.cnames.push(target);
        current = cname.data.start;
    }
    for record in answers {
        let record = record?;
        let ip = match record.kind {
            TYPE_A | TYPE_AAAA if names_equal(packet, record.owner, packet, current)? => {
                address(packet, &record.data)?
            }
            _ => continue,
        };
        ttl = lowest_ttl(ttl, record.ttl);
        summary.ips.push(ip);
    }
    dedup_keeping_order(&mut summary.ips);
    summary.ttl = ttl.unwrap_or(0);
    Ok(summary)
}

/// Addresses up to which repeats are found by scanning what was kept.
const DEDUP_SCAN_MAX: usize = 16;

/// Drops repeated addresses, keeping the first of each in answer order: in place by scanning
/// for the handful a real answer has, with a set for the thousands a crafted 64 KiB answer can
/// carry (a scan for each would be quadratic).
fn dedup_keeping_order(ips: &mut Vec<IpAddr>) {
    if ips.len() > DEDUP_SCAN_MAX {
        let mut seen = std::collections::HashSet::with_capacity(ips.len());
        ips.retain(|ip| seen.insert(*ip));
        return;
    }
    let mut kept = 0;
    for index in 0..ips.len() {
        let ip = ips[index];
        if !ips[..kept].contains(&ip) {
            ips.swap(kept, index);
            kept += 1;
        }
    }
    ips.truncate(kept);
}

/// The first of `cnames` owned by the name at `owner`.
fn first_cname_of<'r>(
    packet: &[u8],
    cnames: &'r [Record],
    owner: usize,
) -> Result<Option<&'r Record>, WireError> {
    for record in cnames {
        if names_equal(packet, record.owner, packet, owner)? {
            return Ok(Some(record));
        }
    }
    Ok(None)
}

fn address(packet: &[u8], data: &Range<usize>) -> Result<IpAddr, WireError> {
    let bytes = packet.get(data.clone()).ok_or(WireError::Short)?;
    if let Ok(octets) = <[u8; 4]>::try_from(bytes) {
        Ok(IpAddr::V4(Ipv4Addr::from(octets)))
    } else if let Ok(octets) = <[u8; 16]>::try_from(bytes) {
        Ok(IpAddr::V6(Ipv6Addr::from(octets)))
    } else {
        Err(WireError::BadRecord)
    }
}

/// The fixed 12 octets every message starts with.
struct Header {
    id: u16,
    flags: [u8; 2],
    question_count: u16,
    answer_count: u16,
    authority_count: u16,
    additional_count: u16,
}

impl Header {
    fn read(packet: &[u8]) -> Result<Self, WireError> {
        let Some(
            &[
                id_0,
                id_1,
                flags_0,
                flags_1,
                qd_0,
                qd_1,
                an_0,
                an_1,
                ns_0,
                ns_1,
                ar_0,
                ar_1,
            ],
        ) = packet.first_chunk::<HEADER_LEN>()
        else {
            return Err(WireError::Short);
        };
        Ok(Self {
            id: u16::from_be_bytes([id_0, id_1]),
            flags: [flags_0, flags_1],
            question_count: u16::from_be_bytes([qd_0, qd_1]),
            answer_count: u16::from_be_bytes([an_0, an_1]),
            authority_count: u16::from_be_bytes([ns_0, ns_1]),
            additional_count: u16::from_be_bytes([ar_0, ar_1]),
        })
    }

    fn is_response(&self) -> bool {
        self.flags[0] & FLAG_QR != 0
    }

    /// Records in all three record sections.
    fn record_count(&self) -> usize {
        self.additional_start() + usize::from(self.additional_count)
    }

    /// The index, counting records from the answer section on, of the first additional record.
    fn additional_start(&self) -> usize {
        usize::from(self.answer_count) + usize::from(self.authority_count)
    }
}

/// A resource record's fixed fields, with its owner name and data left in the packet.
#[derive(Debug, Clone)]
struct Record {
    owner: usize,
    kind: u16,
    class: u16,
    ttl: u32,
    data: Range<usize>,
}

/// Reads records one after another; stops after the first error.
#[derive(Debug, Clone)]
struct Records<'a> {
    packet: &'a [u8],
    position: usize,
    remaining: usize,
}

impl<'a> Records<'a> {
    fn new(packet: &'a [u8], position: usize, count: usize) -> Self {
        Self {
            packet,
            position,
            remaining: count,
        }
    }
}

impl Iterator for Records<'_> {
    type Item = Result<Record, WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.remaining == 0 {
            return None;
        }
        self.remaining -= 1;
        let read = read_record(self.packet, self.position);
        match &read {
            Ok(record) => self.position = record.data.end,
            Err(_) => self.remaining = 0,
        }
        Some(read)
    }
}

fn read_record(packet: &[u8], owner: usize) -> Result<Record, WireError> {
    let name_end = skip_name(packet, owner)?;
    let data_start = name_end + RECORD_FIXED_LEN;
    let data_end = data_start + usize::from(read_u16(packet, name_end + 8)?);
    if data_end > packet.len() {
        return Err(WireError::Short);
    }
    let record = Record {
        owner,
        kind: read_u16(packet, name_end)?,
        class: read_u16(packet, name_end + 2)?,
        ttl: read_u32(packet, name_end + RECORD_TTL_AT)?,
        data: data_start..data_end,
    };
    check_data(packet, &record)?;
    Ok(record)
}

/// Checks the data of the record types this module interprets, wherever they appear, so that
/// what would have failed hickory's decode fails here too.
fn check_data(packet: &[u8], record: &Record) -> Result<(), WireError> {
    let fits = match record.kind {
        TYPE_A => record.data.len() == 4,
        TYPE_AAAA => record.data.len() == 16,
        TYPE_CNAME => skip_name(packet, record.data.start)? == record.data.end,
        TYPE_OPT => packet.get(record.owner) == Some(&0),
        _ => true,
    };
    if fits {
        Ok(())
    } else {
        Err(WireError::BadRecord)
    }
}

fn skip_question(packet: &[u8], at: usize) -> Result<usize, WireError> {
    let end = skip_name(packet, at)? + QUESTION_FIXED_LEN;
    if end > packet.len() {
        return Err(WireError::Short);
    }
    Ok(end)
}

fn read_u16(packet: &[u8], at: usize) -> Result<u16, WireError> {
    match packet.get(at..at + 2) {
        Some(&[high, low]) => Ok(u16::from_be_bytes([high, low])),
        _ => Err(WireError::Short),
    }
}

fn read_u32(packet: &[u8], at: usize) -> Result<u32, WireError> {
    match packet.get(at..at + 4) {
        Some(&[b0, b1, b2, b3]) => Ok(u32::from_be_bytes([b0, b1, b2, b3])),
        _ => Err(WireError::Short),
    }
}

/// Walks a name's labels where it lies, following compression pointers.
struct Labels<'a> {
    packet: &'a [u8],
    position: usize,
    /// Where the run of labels being read began. A pointer must jump before it, so every jump
    /// goes strictly backwards and no pointer chain can loop.
    run_start: usize,
    /// Where the run that jumped here began: a run reached through a pointer may not reach
    /// back into it (hickory's rule, so that both read the same names).
    run_limit: usize,
    jumps: usize,
    /// Octets of the name so far, counting each length octet and the root's.
    length: usize,
    /// Just past the name where it is written: after its first pointer or its root label.
    end: Option<usize>,
    done: bool,
}

impl<'a> Labels<'a> {
    fn new(packet: &'a [u8], at: usize) -> Self {
        Self {
            packet,
            position: at,
            run_start: at,
            run_limit: usize::MAX,
            jumps: 0,
            length: 1,
            end: None,
            done: false,
        }
    }

    /// The next label, or `None` after the root.
    fn next_label(&mut self) -> Result<Option<&'a [u8]>, WireError> {
        while !self.done {
            if self.position >= self.run_limit {
                return Err(WireError::BadName);
            }
            let length = *self.packet.get(self.position).ok_or(WireError::Short)?;
            match length & LABEL_KIND_MASK {
                LABEL_PLAIN if length == 0 => {
                    self.end.get_or_insert(self.position + 1);
                    self.done = true;
                }
                LABEL_PLAIN => {
                    let start = self.position + 1;
                    let end = start + usize::from(length);
                    let label = self.packet.get(start..end).ok_or(WireError::Short)?;
                    self.length += label.len() + 1;
                    if self.length > MAX_NAME_LEN {
                        return Err(WireError::BadName);
                    }
                    self.position = end;
                    return Ok(Some(label));
                }
                LABEL_POINTER => {
                    let low = *self.packet.get(self.position + 1).ok_or(WireError::Short)?;
                    let target = usize::from(u16::from_be_bytes([length & !LABEL_KIND_MASK, low]));
                    self.jumps += 1;
                    // The header holds no names, so a pointer into it is never meaningful.
                    if target < HEADER_LEN
                        || target >= self.run_start
                        || self.jumps > MAX_POINTER_JUMPS
                    {
                        return Err(WireError::BadName);
                    }
                    self.end.get_or_insert(self.position + 2);
                    self.run_limit = self.run_start;
                    self.run_start = target;
                    self.position = target;
                }
                _ => return Err(WireError::BadName),
            }
        }
        Ok(None)
    }

    /// Reads the rest of the name; returns where it ends in place.
    fn finish(mut self) -> Result<usize, WireError> {
        while self.next_label()?.is_some() {}
        self.end.ok_or(WireError::Short)
    }
}

/// Checks the name at `at` and returns where it ends in place.
fn skip_name(packet: &[u8], at: usize) -> Result<usize, WireError> {
    Labels::new(packet, at).finish()
}

/// Whether two names are equal ignoring ASCII case, compared label by label where they lie.
fn names_equal(
    packet_a: &[u8],
    at_a: usize,
    packet_b: &[u8],
    at_b: usize,
) -> Result<bool, WireError> {
    let mut labels_a = Labels::new(packet_a, at_a);
    let mut labels_b = Labels::new(packet_b, at_b);
    loop {
        match (labels_a.next_label()?, labels_b.next_label()?) {
            (Some(label_a), Some(label_b)) if label_a.eq_ignore_ascii_case(label_b) => {}
            (None, None) => return Ok(true),
            _ => return Ok(false),
        }
    }
}

/// The name at `at` as text (see [`Query::qname`]) and where it ends in place.
fn read_name_text(packet: &[u8], at: usize) -> Result<(String, usize), WireError> {
    // Sized by a first walk over the name (a few dozen bytes) so that the text is written once:
    // grown as it was written, it cost about 1.5% of the proxy's samples under load.
    let mut sizing = Labels::new(packet, at);
    let mut length = 0;
    while let Some(label) = sizing.next_label()? {
        length += escaped_length(label) + 1;
    }
    let mut labels = Labels::new(packet, at);
    let mut text = String::with_capacity(length.max(1));
    while let Some(label) = labels.next_label()? {
        push_escaped(&mut text, label);
        text.push('.');
    }
    if text.is_empty() {
        text.push('.');
    }
    Ok((text, labels.finish()?))
}

/// How a label's byte is written in text: as itself, after a backslash, or as `\ooo`.
enum Escaped {
    Plain(u8),
    Backslash(u8),
    Octal(u8),
}

impl Escaped {
    /// The byte at `index` of a label, lowercased and escaped as hickory's `Label::write_ascii`
    /// does, which is what policy names were matched against before this module existed.
    fn of(index: usize, byte: u8) -> Escaped {
        let byte = byte.to_ascii_lowercase();
        let first = index == 0;
        if byte.is_ascii_alphanumeric()
            || byte == b'_'
            || (byte == b'-' && !first)
            || (byte == b'*' && first)
        {
            Escaped::Plain(byte)
        } else if byte.is_ascii_graphic() {
            Escaped::Backslash(byte)
        } else {
            Escaped::Octal(byte)
        }
    }

    fn len(&self) -> usize {
        match self {
            Escaped::Plain(_) => 1,
            Escaped::Backslash(_) => 2,
            Escaped::Octal(_) => 4,
        }
    }
}

/// The length of a label as [`push_escaped`] writes it.
fn escaped_length(label: &[u8]) -> usize {
    label
        .iter()
        .enumerate()
        .map(|(index, &byte)| Escaped::of(index, byte).len())
        .sum()
}

/// Appends a label lowercased and escaped ([`Escaped`]).
fn push_escaped(text: &mut String, label: &[u8]) {
    for (index, &byte) in label.iter().enumerate() {
        match Escaped::of(index, byte) {
            Escaped::Plain(byte) => text.push(char::from(byte)),
            Escaped::Backslash(byte) => {
                text.push('\\');
                text.push(char::from(byte));
            }
            Escaped::Octal(byte) => {
                text.push('\\');
                for shift in [6, 3, 0] {
                    text.push(char::from(b'0' + ((byte >> shift) & 0o7)));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::answer::normalized;
    use hickory_proto::op::{
        Edns as HickoryEdns, Message, MessageType, OpCode, Query as HickoryQuery, ResponseCode,
    };
    use hickory_proto::rr::rdata::{A, AAAA, CNAME, MX, NS, TXT};
    use hickory_proto::rr::{DNSClass, Name, RData, Record as HickoryRecord, RecordType};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use std::str::FromStr;

    /// The text is sized before it is written: growing it cost a reallocation or two per query.
    #[test]
    fn a_name_is_written_into_a_string_of_its_own_length() {
        let mut packet = Vec::new();
        for label in [&b"WWW"[..], b"a.b", b"x\x00", b"-y"] {
            packet.push(u8::try_from(label.len()).unwrap());
            packet.extend_from_slice(label);
        }
        packet.push(0);
        let (text, end) = read_name_text(&packet, 0).unwrap();
        assert_eq!(text, "www.a\\.b.x\\000.\\-y.");
        assert_eq!(end, packet.len());
        assert_eq!(text.capacity(), text.len());
        let (root, _) = read_name_text(&[0], 0).unwrap();
        assert_eq!((root.as_str(), root.capacity()), (".", 1));
    }

    fn name(text: &str) -> Name {
        Name::from_str(text).unwrap()
    }

    fn a(owner: &str, ttl: u32, last: u8) -> HickoryRecord {
        HickoryRecord::from_rdata(name(owner), ttl, RData::A(A::new(198, 18, 1, last)))
    }

    fn aaaa(owner: &str, ttl: u32, last: u16) -> HickoryRecord {
        let address = AAAA::new(0xfd00, 0x77, 0, 0, 0, 0, 0, last);
        HickoryRecord::from_rdata(name(owner), ttl, RData::AAAA(address))
    }

    fn cname(owner: &str, ttl: u32, target: &str) -> HickoryRecord {
        HickoryRecord::from_rdata(name(owner), ttl, RData::CNAME(CNAME(name(target))))
    }

    fn query_for(qname: &Name, kind: RecordType) -> Message {
        let mut query = Message::query();
        query.metadata.id = 4242;
        query.metadata.recursion_desired = true;
        query.add_query(HickoryQuery::query(qname.clone(), kind));
        query
    }

    fn response_to(query: &Message, answers: Vec<HickoryRecord>) -> Message {
        let mut response = Message::response(query.metadata.id, OpCode::Query);
        response.add_query(query.queries[0].clone());
        response.add_answers(answers);
        response
    }

    /// The wire bytes of the query's first question, as the proxy keeps them.
    fn asked_bytes(query: &Message) -> Vec<u8> {
        let bytes = query.to_vec().unwrap();
        let parsed = parse_query(&bytes).unwrap();
        bytes[parsed.question].to_vec()
    }

    /// Reads `response` both ways and checks that they agree; returns ours.
    fn read_like_hickory(query: &Message, response: &Message) -> Answer {
        let bytes = response.to_vec().unwrap();
        let decoded = Message::from_vec(&bytes).unwrap();
        let answer = parse_answer(&bytes, &asked_bytes(query)).unwrap();
        let expected = crate::answer::summarize(&decoded, query.queries[0].name());
        assert_eq!(answer.summary, expected);
        assert_eq!(answer.rcode, u16::from(decoded.metadata.response_code));
        assert_eq!(answer.truncated, decoded.metadata.truncation);
        answer
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    /// Only a TC answer to the asked question, cut inside a record, is read as cut short; a cut
    /// answer without TC, or one to another question, stays refused.
    #[test]
    fn a_tc_answer_cut_inside_a_record_is_read_as_cut_short_and_nothing_else_is() {
        let query = query_for(&name("cilium.io."), RecordType::A);
        let asked = asked_bytes(&query);
        let records: Vec<HickoryRecord> = (1..=10).map(|n| a("cilium.io.", 60, n)).collect();
        let cut = |question: &str, tc: bool| {
            let mut response =
                response_to(&query_for(&name(question), RecordType::A), records.clone());
            response.metadata.truncation = tc;
            let mut bytes = response.to_vec().unwrap();
            bytes.truncate(bytes.len() - 5);
            bytes
        };
        let tc = cut("cilium.io.", true);
        assert!(parse_answer(&tc, &asked).is_err());
        let answer = cut_short_answer(&tc, &asked).expect("cut short");
        assert!(answer.truncated && answer.cut_short);
        assert!(answer.summary.ips.is_empty());
        assert_eq!(cut_short_answer(&cut("cilium.io.", false), &asked), None);
        assert_eq!(cut_short_answer(&cut("ebpf.io.", true), &asked), None);
        assert_eq!(cut_short_answer(&tc[..20], &asked), None);
    }

    #[test]
    fn plain_addresses_read_like_hickory() {
        let query = query_for(&name("cilium.io."), RecordType::A);
        let response = response_to(
            &query,
            vec![a("cilium.io.", 300, 1), a("cilium.io.", 60, 2)],
        );
        let answer = read_like_hickory(&query, &response);
        assert_eq!(answer.summary.ips, vec![ip("198.18.1.1"), ip("198.18.1.2")]);
        assert_eq!(answer.summary.ttl, 60);

        let query = query_for(&name("cilium.io."), RecordType::AAAA);
        let response = response_to(&query, vec![aaaa("CILIUM.io.", 30, 0x10)]);
        let answer = read_like_hickory(&query, &response);
        assert_eq!(answer.summary.ips, vec![ip("fd00:77::10")]);
    }

    #[test]
    fn cname_chains_read_like_hickory() {
        let query = query_for(&name("WWW.Cilium.IO."), RecordType::A);
        let response = response_to(
            &query,
            vec![
                a("edge.cilium.io.", 60, 11),
                a("evil.example.", 5, 66),
                cname("www.CILIUM.io.", 300, "Web.Cilium.io."),
                cname("web.cilium.io.", 120, "EDGE.cilium.io."),
                a("edge.cilium.io.", 90, 12),
                a("Edge.Cilium.IO.", 90, 11),
                aaaa("web.cilium.io.", 1, 1),
            ],
        );
        let bytes = response.to_vec().unwrap();
        assert!(
            bytes
                .iter()
                .any(|&byte| byte & LABEL_KIND_MASK == LABEL_POINTER),
            "hickory compresses names, so the pointers are exercised"
        );
        let answer = read_like_hickory(&query, &response);
        assert_eq!(
            answer.summary.ips,
            vec![ip("198.18.1.11"), ip("198.18.1.12")]
        );
        assert_eq!(answer.summary.ttl, 60);
        assert_eq!(
            answer.summary.cnames,
            vec!["web.cilium.io.", "edge.cilium.io."]
        );
    }

    #[test]
    fn loops_and_long_chains_stop_like_hickory() {
        let query = query_for(&name("a.io."), RecordType::A);
        let looping = response_to(
            &query,
            vec![cname("a.io.", 10, "b.io."), cname("b.io.", 10, "a.io.")],
        );
        let answer = read_like_hickory(&query, &looping);
        assert_eq!(answer.summary.cnames.len(), MAX_CHAIN);
        assert!(answer.summary.ips.is_empty());

        let hops: Vec<String> = (0..20).map(|hop| format!("h{hop}.io.")).collect();
        let mut records = vec![cname("a.io.", 50, &hops[0])];
        records.extend(hops.windows(2).map(|pair| cname(&pair[0], 40, &pair[1])));
        records.extend(hops.iter().map(|hop| a(hop, 30, 1)));
        let long = response_to(&query, records);
        let answer = read_like_hickory(&query, &long);
        assert_eq!(answer.summary.cnames.len(), MAX_CHAIN);
        assert_eq!(answer.summary.ips, vec![ip("198.18.1.1")]);
    }

    #[test]
    fn other_types_and_sections_are_skipped_like_hickory() {
        let query = query_for(&name("cilium.io."), RecordType::A);
        let mut response = response_to(
            &query,
            vec![
                HickoryRecord::from_rdata(
                    name("cilium.io."),
                    7,
                    RData::TXT(TXT::new(vec!["v=spf1".into()])),
                ),
                HickoryRecord::from_rdata(
                    name("cilium.io."),
                    7,
                    RData::MX(MX::new(10, name("mail.cilium.io."))),
                ),
                a("cilium.io.", 300, 1),
            ],
        );
        response.add_authority(HickoryRecord::from_rdata(
            name("cilium.io."),
            3,
            RData::NS(NS(name("ns.cilium.io."))),
        ));
        response.add_additional(a("ns.cilium.io.", 3, 9));
        let answer = read_like_hickory(&query, &response);
        assert_eq!(answer.summary.ips, vec![ip("198.18.1.1")]);
        assert_eq!(answer.summary.ttl, 300);
    }

    #[test]
    fn rcodes_edns_and_truncation_read_like_hickory() {
        let query = query_for(&name("missing.cilium.io."), RecordType::A);
        let mut nxdomain = response_to(&query, vec![]);
        nxdomain.metadata.response_code = ResponseCode::NXDomain;
        let answer = read_like_hickory(&query, &nxdomain);
        assert_eq!(answer.rcode, 3);
        assert_eq!(answer.summary, AnswerSummary::default());

        let mut badvers = response_to(&query, vec![]);
        badvers.metadata.response_code = ResponseCode::BADVERS;
        let mut edns = HickoryEdns::new();
        edns.set_dnssec_ok(true);
        badvers.set_edns(edns);
        assert_eq!(read_like_hickory(&query, &badvers).rcode, 16);

        let mut truncated = response_to(&query, vec![a("missing.cilium.io.", 5, 1)]);
        truncated.metadata.truncation = true;
        truncated.set_edns(HickoryEdns::new());
        assert!(read_like_hickory(&query, &truncated).truncated);
    }

    #[test]
    fn query_names_read_like_hickory() {
        let odd = Name::from_labels(vec![
            b"A b".to_vec(),
            vec![0, 0x7f, 0xff, b'\\'],
            b"-x*".to_vec(),
            b"*-".to_vec(),
            b"dot.in".to_vec(),
            b"_srv".to_vec(),
            b"\"q\"".to_vec(),
        ])
        .unwrap();
        let longest = Name::from_labels(vec![
            vec![b'a'; 63],
            vec![b'B'; 63],
            vec![b'c'; 63],
            vec![b'D'; 61],
        ])
        .unwrap();
        for qname in [
            name("www.cilium.io."),
            name("WWW.Cilium.IO."),
            Name::root(),
            odd,
            longest,
        ] {
            let bytes = query_for(&qname, RecordType::AAAA).to_vec().unwrap();
            let query = parse_query(&bytes).unwrap();
            assert_eq!(query.qname, normalized(&qname));
            assert_eq!(query.qtype, u16::from(RecordType::AAAA));
            assert_eq!(query.qclass, u16::from(DNSClass::IN));
            assert_eq!(query.id, 4242);
            assert_eq!(query.question_count, 1);
            assert_eq!(query.questions_end, bytes.len());
            assert_eq!(query.edns, None);
        }
    }

    #[test]
    fn query_headers_and_edns_are_read() {
        let mut message = query_for(&name("cilium.io."), RecordType::TXT);
        message.metadata.op_code = OpCode::Notify;
        let mut edns = HickoryEdns::new();
        edns.set_max_payload(4096);
        edns.set_dnssec_ok(true);
        message.set_edns(edns);
        let bytes = message.to_vec().unwrap();
        let query = parse_query(&bytes).unwrap();
        assert_eq!(query.opcode, u8::from(OpCode::Notify));
        assert_eq!(query.qtype, u16::from(RecordType::TXT));
        assert_eq!(query.question, 12..bytes.len() - 11);
        assert_eq!(
            query.edns,
            Some(Edns {
                max_payload: 4096,
                dnssec_ok: true
            })
        );
    }

    /// A header with the given flags and counts, for packets hickory would not build.
    fn header(flags: u16, counts: [u16; 4]) -> Vec<u8> {
        let mut packet = vec![0x12, 0x34];
        packet.extend_from_slice(&flags.to_be_bytes());
        for count in counts {
            packet.extend_from_slice(&count.to_be_bytes());
        }
        packet
    }

    fn push_name(packet: &mut Vec<u8>, text: &str) {
        for label in text.split('.').filter(|label| !label.is_empty()) {
            packet.push(u8::try_from(label.len()).unwrap());
            packet.extend_from_slice(label.as_bytes());
        }
        packet.push(0);
    }

    fn push_record(packet: &mut Vec<u8>, kind: u16, ttl: u32, data: &[u8]) {
        packet.extend_from_slice(&kind.to_be_bytes());
        packet.extend_from_slice(&1u16.to_be_bytes());
        packet.extend_from_slice(&ttl.to_be_bytes());
        packet.extend_from_slice(&u16::try_from(data.len()).unwrap().to_be_bytes());
        packet.extend_from_slice(data);
    }

    const RESPONSE: u16 = 0x8180;

    #[test]
    fn malformed_queries_are_errors() {
        assert_eq!(parse_query(&[0; 11]).unwrap_err(), WireError::Short);
        assert_eq!(
            parse_query(&header(0x0100, [1, 0, 0, 0])).unwrap_err(),
            WireError::Short
        );
        assert_eq!(
            parse_query(&header(RESPONSE, [0, 0, 0, 0])).unwrap_err(),
            WireError::NotAQuery
        );
        // Too many questions to read is still a query, answered FORMERR from its header.
        let mut many = header(0x0100, [17, 0, 0, 0]);
        many[..2].copy_from_slice(&0xBEEFu16.to_be_bytes());
        let query = parse_query(&many).unwrap();
        assert_eq!((query.question_count, query.qname.as_str()), (17, ""));
        let answer = error_response(&query, u16::from(ResponseCode::FormErr));
        let answer = Message::from_vec(&answer).unwrap();
        assert_eq!(answer.metadata.id, 0xBEEF);
        assert_eq!(answer.metadata.response_code, ResponseCode::FormErr);
        assert_eq!(answer.queries.len(), 0);

        let bad_names: [&[u8]; 5] = [
            &[0xC0, 12],      // points at itself
            &[0xC0, 20],      // points forwards
            &[0xC0, 2],       // points into the header
            &[0x41, b'a', 0], // reserved label type 01
            &[0x81, b'a', 0], // reserved label type 10
        ];
        for name in bad_names {
            let mut packet = header(0, [1, 0, 0, 0]);
            packet.extend_from_slice(name);
            packet.extend_from_slice(&[0, 1, 0, 1, 0, 0, 0, 0, 0, 0]);
            assert_eq!(
                parse_query(&packet).unwrap_err(),
                WireError::BadName,
                "{name:?}"
            );
        }

        // A second question that points at itself through a label: a loop.
        let mut looping = header(0, [2, 0, 0, 0]);
        push_name(&mut looping, "a.");
        looping.extend_from_slice(&[0, 1, 0, 1]);
        looping.extend_from_slice(&[1, b'b', 0xC0, 19, 0, 1, 0, 1]);
        assert_eq!(parse_query(&looping).unwrap_err(), WireError::BadName);

        let mut too_long = header(0, [1, 0, 0, 0]);
        for _ in 0..4 {
            too_long.push(63);
            too_long.extend_from_slice(&[b'x'; 63]);
        }
        too_long.extend_from_slice(&[0, 0, 1, 0, 1]);
        assert_eq!(parse_query(&too_long).unwrap_err(), WireError::BadName);

        let mut records_cut = header(0, [1, 0, 0, 1]);
        push_name(&mut records_cut, "cilium.io.");
        records_cut.extend_from_slice(&[0, 1, 0, 1, 0, 0, 41, 0x10]);
        assert_eq!(parse_query(&records_cut).unwrap_err(), WireError::Short);
    }

    #[test]
    fn pointer_chains_are_bounded() {
        let mut packet = header(0, [1, 0, 0, 200]);
        push_name(&mut packet, "a.");
        packet.extend_from_slice(&[0, 1, 0, 1]);
        let mut previous = HEADER_LEN;
        for _ in 0..200 {
            let here = packet.len();
            packet.extend_from_slice(&u16::try_from(0xC000 | previous).unwrap().to_be_bytes());
            push_record(&mut packet, 16, 0, &[]);
            previous = here;
        }
        assert_eq!(parse_query(&packet).unwrap_err(), WireError::BadName);
    }

    #[test]
    fn a_query_without_question_is_read_for_a_formerr() {
        let mut packet = header(0x0100, [0, 0, 0, 1]);
        packet.extend_from_slice(&[0, 0, 41, 0x04, 0xD0, 0, 0, 0x80, 0, 0, 0]);
        let query = parse_query(&packet).unwrap();
        assert_eq!(query.qname, "");
        assert_eq!(query.question, 12..12);
        assert_eq!(query.questions_end, 12);
        assert_eq!(
            query.edns,
            Some(Edns {
                max_payload: 1232,
                dnssec_ok: true
            })
        );
        let response = Message::from_vec(&error_response(&query, 1)).unwrap();
        assert_eq!(response.metadata.response_code, ResponseCode::FormErr);
        assert!(response.queries.is_empty());
        assert!(response.edns.is_some());
    }

    #[test]
    fn error_responses_echo_the_query() {
        let mut message = query_for(&name("BBC.co.uk."), RecordType::AAAA);
        message.metadata.checking_disabled = true;
        message.metadata.op_code = OpCode::Status;
        let bytes = message.to_vec().unwrap();
        let query = parse_query(&bytes).unwrap();
        let written = error_response(&query, u16::from(ResponseCode::Refused));
        assert_eq!(
            &written[12..],
            &bytes[12..],
            "questions echoed byte for byte"
        );
        let response = Message::from_vec(&written).unwrap();
        assert_eq!(response.metadata.id, 4242);
        assert_eq!(response.metadata.message_type, MessageType::Response);
        assert_eq!(response.metadata.op_code, OpCode::Status);
        assert_eq!(response.metadata.response_code, ResponseCode::Refused);
        assert!(response.metadata.recursion_desired);
        assert!(response.metadata.recursion_available);
        assert!(response.metadata.checking_disabled);
        assert!(!response.metadata.authoritative);
        assert!(!response.metadata.truncation);
        assert!(!response.metadata.authentic_data);
        assert_eq!(response.queries, message.queries);
        assert!(response.answers.is_empty());
        assert!(response.edns.is_none());

        let mut message = query_for(&name("cilium.io."), RecordType::A);
        message.metadata.recursion_desired = false;
        let mut edns = HickoryEdns::new();
        edns.set_dnssec_ok(true);
        edns.set_max_payload(1400);
        message.set_edns(edns);
        let bytes = message.to_vec().unwrap();
        let query = parse_query(&bytes).unwrap();
        let written = error_response(&query, u16::from(ResponseCode::BADCOOKIE));
        let response = Message::from_vec(&written).unwrap();
        assert_eq!(response.metadata.response_code, ResponseCode::BADCOOKIE);
        assert!(!response.metadata.recursion_desired);
        assert!(!response.metadata.checking_disabled);
        let edns = response.edns.unwrap();
        assert!(edns.flags().dnssec_ok);
        assert_eq!(edns.max_payload(), 1400);
        assert_eq!(edns.version(), 0);
        assert!(edns.options().as_ref().is_empty());
    }

    #[test]
    fn error_responses_advertise_at_least_512() {
        let mut packet = header(0x0100, [1, 0, 0, 1]);
        push_name(&mut packet, "cilium.io.");
        packet.extend_from_slice(&[0, 1, 0, 1]);
        packet.extend_from_slice(&[0, 0, 41, 0, 100, 0, 0, 0, 0, 0, 0]);
        let query = parse_query(&packet).unwrap();
        assert_eq!(query.edns.unwrap().max_payload, 100);
        let written = error_response(&query, 2);
        assert_eq!(&written[written.len() - 8..written.len() - 6], &[2, 0]);
        let response = Message::from_vec(&written).unwrap();
        assert_eq!(response.metadata.response_code, ResponseCode::ServFail);
        assert!(!response.edns.unwrap().flags().dnssec_ok);
    }

    #[test]
    fn answers_to_other_questions_are_refused() {
        let query = query_for(&name("www.Cilium.io."), RecordType::A);
        let asked = asked_bytes(&query);
        let same_name_other_case = query_for(&name("WWW.cilium.IO."), RecordType::A);
        let bytes = response_to(&same_name_other_case, vec![a("www.cilium.io.", 5, 1)])
            .to_vec()
            .unwrap();
        assert_eq!(
            parse_answer(&bytes, &asked).unwrap().summary.ips,
            vec![ip("198.18.1.1")]
        );

        for other in [
            query_for(&name("www.cilium.io.com."), RecordType::A),
            query_for(&name("ww.cilium.io."), RecordType::A),
            query_for(&name("www.cilium.io."), RecordType::AAAA),
        ] {
            let bytes = response_to(&other, vec![]).to_vec().unwrap();
            assert_eq!(
                parse_answer(&bytes, &asked).unwrap_err(),
                WireError::QuestionMismatch
            );
        }

        let mut as_query = response_to(&query, vec![]);
        as_query.metadata.message_type = MessageType::Query;
        let bytes = as_query.to_vec().unwrap();
        assert_eq!(
            parse_answer(&bytes, &asked).unwrap_err(),
            WireError::NotAResponse
        );
        assert_eq!(
            parse_answer(&header(RESPONSE, [0, 0, 0, 0]), &asked).unwrap_err(),
            WireError::NoQuestion
        );
    }

    /// An old server's FORMERR to an EDNS query, without the question, was dropped as
    /// malformed: the client got SERVFAIL at the timeout instead of the error it falls back on.
    #[test]
    fn an_error_without_the_question_is_taken_and_nothing_else_is() {
        let query = query_for(&name("cilium.io."), RecordType::A);
        let asked = asked_bytes(&query);
        for (rcode, taken) in [
            (ResponseCode::FormErr, true),
            (ResponseCode::NotImp, true),
            (ResponseCode::NoError, false),
            (ResponseCode::ServFail, false),
        ] {
            let mut bare = Message::response(query.metadata.id, OpCode::Query);
            bare.metadata.response_code = rcode;
            let bytes = bare.to_vec().unwrap();
            match parse_answer(&bytes, &asked) {
                Ok(answer) => {
                    assert!(taken, "{rcode:?}");
                    assert_eq!(answer.rcode, u16::from(rcode));
                    assert_eq!(answer.summary, AnswerSummary::default());
                }
                Err(error) => {
                    assert!(!taken, "{rcode:?}: {error:?}");
                    assert_eq!(error, WireError::NoQuestion);
                }
            }
        }
        // With a record in it, it is no bare error.
        let mut with_record = Message::response(query.metadata.id, OpCode::Query);
        with_record.metadata.response_code = ResponseCode::FormErr;
        with_record.add_answer(a("cilium.io.", 60, 1));
        let bytes = with_record.to_vec().unwrap();
        assert_eq!(parse_answer(&bytes, &asked), Err(WireError::NoQuestion));
    }

    #[test]
    fn every_prefix_of_an_answer_is_short() {
        let query = query_for(&name("www.cilium.io."), RecordType::A);
        let mut response = response_to(
            &query,
            vec![
                cname("www.cilium.io.", 300, "edge.cilium.io."),
                a("edge.cilium.io.", 60, 1),
            ],
        );
        response.set_edns(HickoryEdns::new());
        let bytes = response.to_vec().unwrap();
        let asked = asked_bytes(&query);
        assert!(parse_answer(&bytes, &asked).is_ok());
        for length in 0..bytes.len() {
            assert_eq!(
                parse_answer(&bytes[..length], &asked),
                Err(WireError::Short),
                "prefix of {length}"
            );
        }
    }

    /// An answer with a long-lived chain, authority and additional records and an OPT whose
    /// TTL field holds the DO bit and an extended RCODE.
    fn long_lived_answer() -> (Message, Vec<u8>) {
        let query = query_for(&name("www.cilium.io."), RecordType::A);
        let mut response = response_to(
            &query,
            vec![
                cname("www.cilium.io.", 604_800, "edge.cilium.io."),
                a("edge.cilium.io.", 30, 1),
                a("edge.cilium.io.", 0xFFFF_FFF0, 2),
            ],
        );
        response.add_authority(HickoryRecord::from_rdata(
            name("cilium.io."),
            172_800,
            RData::NS(NS(name("ns.cilium.io."))),
        ));
        response.add_additional(a("ns.cilium.io.", 86_400, 9));
        let mut edns = HickoryEdns::new();
        edns.set_dnssec_ok(true);
        response.set_edns(edns);
        // Carried in the OPT record's TTL field (its high bits), which no cap may touch.
        response.metadata.response_code = ResponseCode::BADVERS;
        (query, response.to_vec().unwrap())
    }

    #[test]
    fn the_longest_ttl_is_the_records_not_the_opt_flags() {
        let (query, bytes) = long_lived_answer();
        let answer = parse_answer(&bytes, &asked_bytes(&query)).unwrap();
        assert_eq!(answer.longest_ttl, 0xFFFF_FFF0);

        let query = query_for(&name("cilium.io."), RecordType::A);
        let mut response = response_to(&query, vec![a("cilium.io.", 60, 1)]);
        let mut edns = HickoryEdns::new();
        edns.set_dnssec_ok(true);
        response.set_edns(edns);
        let bytes = response.to_vec().unwrap();
        let answer = parse_answer(&bytes, &asked_bytes(&query)).unwrap();
        assert_eq!(answer.longest_ttl, 60, "the DO bit is not a TTL");
    }

    #[test]
    fn capped_ttls_are_rewritten_in_every_section_and_opt_is_left_alone() {
        let (query, mut bytes) = long_lived_answer();
        let before = Message::from_vec(&bytes).unwrap();
        cap_ttls(&mut bytes, 3_600).unwrap();
        let after = Message::from_vec(&bytes).unwrap();
        let ttls = |records: &[HickoryRecord]| records.iter().map(|r| r.ttl).collect::<Vec<_>>();
        // The 2^31-or-more TTL reads as 0, as the cache takes it; 30 stays.
        assert_eq!(ttls(&after.answers), vec![3_600, 30, 0]);
        assert_eq!(ttls(&after.authorities), vec![3_600]);
        assert_eq!(ttls(&after.additionals), vec![3_600]);
        assert_eq!(after.edns, before.edns, "the OPT flags and extended RCODE");
        assert_eq!(after.answers.len(), before.answers.len());
        for (capped, original) in after.answers.iter().zip(&before.answers) {
            assert_eq!(
                (&capped.name, &capped.data),
                (&original.name, &original.data)
            );
        }
        // What the client is told and what the cache records now agree.
        let answer = parse_answer(&bytes, &asked_bytes(&query)).unwrap();
        assert_eq!((answer.summary.ttl, answer.longest_ttl), (0, 3_600));
        assert_eq!(answer.rcode, 16, "extended RCODE still read");
    }

    /// Where each record's TTL field lies in `packet` (every section, OPT included).
    fn ttl_fields(packet: &[u8]) -> Vec<Range<usize>> {
        let header = Header::read(packet).unwrap();
        let mut position = HEADER_LEN;
        for _ in 0..header.question_count {
            position = skip_question(packet, position).unwrap();
        }
        let mut fields = Vec::new();
        for _ in 0..header.record_count() {
            let record = read_record(packet, position).unwrap();
            let at = record.data.start - RECORD_FIXED_LEN + RECORD_TTL_AT;
            fields.push(at..at + 4);
            position = record.data.end;
        }
        fields
    }

    #[test]
    fn a_cap_above_every_ttl_changes_nothing() {
        let (_, bytes) = long_lived_answer();
        let mut capped = bytes.clone();
        cap_ttls(&mut capped, u32::MAX).unwrap();
        // Only the top-bit TTL (the third answer record's), which any cap reads as 0.
        let before = Message::from_vec(&bytes).unwrap();
        let after = Message::from_vec(&capped).unwrap();
        let mut expected = before.clone();
        expected.answers[2].ttl = 0;
        assert_eq!(after, expected);
        let top_bit_field = ttl_fields(&bytes)[2].clone();
        assert!((0..bytes.len()).all(|i| bytes[i] == capped[i] || top_bit_field.contains(&i)));
        let query = query_for(&name("cilium.io."), RecordType::A);
        let plain = response_to(&query, vec![a("cilium.io.", 60, 1)])
            .to_vec()
            .unwrap();
        let mut capped = plain.clone();
        cap_ttls(&mut capped, 60).unwrap();
        assert_eq!(capped, plain);
    }

    /// A TTL of 2^31 or more was cached, allowed and persisted for up to 136 years, and
    /// 0xFFFFFFFF alone became 0; RFC 2181 §8 has every such value read as 0.
    #[test]
    fn ttls_with_the_top_bit_set_count_as_zero() {
        for (wire_ttl, usable) in [
            (0x7FFF_FFFF, 0x7FFF_FFFF),
            (0x8000_0000, 0),
            (0xFFFF_FFFE, 0),
            (0xFFFF_FFFF, 0),
        ] {
            let mut packet = header(RESPONSE, [1, 2, 0, 0]);
            push_name(&mut packet, "cilium.io.");
            packet.extend_from_slice(&[0, 1, 0, 1]);
            packet.extend_from_slice(&[0xC0, 12]);
            push_record(&mut packet, TYPE_A, wire_ttl, &[10, 0, 0, 1]);
            packet.extend_from_slice(&[0xC0, 12]);
            push_record(&mut packet, TYPE_A, 0x7FFF_FFFF, &[10, 0, 0, 2]);
            let asked = &packet[12..27].to_vec();
            let answer = parse_answer(&packet, asked).unwrap();
            assert_eq!(answer.summary.ips.len(), 2);
            assert_eq!(answer.summary.ttl, usable, "wire TTL {wire_ttl:#x}");
        }
    }

    #[test]
    fn unknown_record_types_are_skipped_by_their_length() {
        let mut packet = header(RESPONSE, [1, 3, 0, 0]);
        push_name(&mut packet, "cilium.io.");
        packet.extend_from_slice(&[0, 1, 0, 1]);
        packet.extend_from_slice(&[0xC0, 12]);
        push_record(&mut packet, 0xFF00, 1, &[0xC0, 0, 0xFF, 63, 0]);
        packet.extend_from_slice(&[0xC0, 12]);
        push_record(&mut packet, TYPE_A, 70, &[10, 0, 0, 1]);
        packet.extend_from_slice(&[0xC0, 12]);
        push_record(&mut packet, 0xFF01, 1, &[]);
        let asked = &packet[12..27].to_vec();
        let answer = parse_answer(&packet, asked).unwrap();
        assert_eq!(answer.summary.ips, vec![ip("10.0.0.1")]);
        assert_eq!(answer.summary.ttl, 70);

        let mut short_a = header(RESPONSE, [1, 1, 0, 0]);
        push_name(&mut short_a, "cilium.io.");
        short_a.extend_from_slice(&[0, 1, 0, 1, 0xC0, 12]);
        push_record(&mut short_a, TYPE_A, 70, &[10, 0, 0]);
        assert_eq!(
            parse_answer(&short_a, asked).unwrap_err(),
            WireError::BadRecord
        );
    }

    /// Valid packets to mutate, and the question each answer answers.
    fn fuzz_seeds() -> (Vec<Vec<u8>>, Vec<u8>) {
        let query = query_for(&name("www.cilium.io."), RecordType::A);
        let mut with_edns = query.clone();
        let mut edns = HickoryEdns::new();
        edns.set_dnssec_ok(true);
        with_edns.set_edns(edns.clone());
        let mut chain = response_to(
            &query,
            vec![
                cname("www.cilium.io.", 300, "web.cilium.io."),
                cname("web.cilium.io.", 120, "edge.cilium.io."),
                a("edge.cilium.io.", 60, 1),
                aaaa("edge.cilium.io.", 60, 2),
                a("other.io.", 60, 3),
            ],
        );
        chain.set_edns(edns);
        let mut nxdomain = response_to(&query, vec![]);
        nxdomain.metadata.response_code = ResponseCode::NXDomain;
        nxdomain.add_authority(HickoryRecord::from_rdata(
            name("cilium.io."),
            3,
            RData::NS(NS(name("ns.cilium.io."))),
        ));
        let seeds = [&query, &with_edns, &chain, &nxdomain]
            .iter()
            .map(|message| message.to_vec().unwrap())
            .collect();
        (seeds, asked_bytes(&query))
    }

    fn mutate(rng: &mut StdRng, packet: &mut Vec<u8>) {
        for _ in 0..rng.random_range(1..=4) {
            let at = rng.random_range(0..packet.len().max(1));
            match rng.random_range(0..6) {
                0 => packet.truncate(at),
                1 => packet.insert(at.min(packet.len()), rng.random()),
                _ => {
                    let byte = [0x00, 0xC0, 0x3F, 0x40, 0xFF, rng.random()][rng.random_range(0..6)];
                    if let Some(slot) = packet.get_mut(at) {
                        *slot = byte;
                    }
                }
            }
        }
    }

    #[test]
    fn mutated_packets_never_panic_and_agree_with_hickory() {
        let (seeds, asked) = fuzz_seeds();
        let asked_name = name("www.cilium.io.");
        let mut rng = StdRng::seed_from_u64(0x5eed_d115);
        let mut compared = 0;
        for round in 0..20_000 {
            let mut packet = seeds[round % seeds.len()].clone();
            mutate(&mut rng, &mut packet);
            let decoded = Message::from_vec(&packet).ok();
            if let Ok(query) = parse_query(&packet) {
                let response = error_response(&query, u16::from(ResponseCode::BADCOOKIE));
                let echoed = Message::from_vec(&response).expect("hickory reads our answer");
                // More than it reads: answered from the header alone.
                let echoed_count = if query.question_count > MAX_QUESTIONS {
                    0
                } else {
                    usize::from(query.question_count)
                };
                assert_eq!(echoed.queries.len(), echoed_count);
                if echoed_count > 0
                    && let Some(hickory) = decoded.as_ref().and_then(|m| m.queries.first())
                {
                    assert_eq!(query.qname, normalized(hickory.name()));
                    assert_eq!(query.qtype, u16::from(hickory.query_type()));
                    compared += 1;
                }
            }
            if let Ok(answer) = parse_answer(&packet, &asked)
                && let Some(decoded) = &decoded
            {
                let expected = crate::answer::summarize(decoded, &asked_name);
                assert_eq!(answer.summary, expected, "{packet:?}");
                assert_eq!(answer.rcode, u16::from(decoded.metadata.response_code));
                compared += 1;
            }
            // Whatever the reader accepts, the cap rewrites; and only the TTLs.
            if let Ok(answer) = parse_answer(&packet, &asked) {
                let mut capped = packet.clone();
                cap_ttls(&mut capped, 7).expect("an accepted answer can be capped");
                let fields = ttl_fields(&packet);
                assert!(
                    (0..packet.len())
                        .all(|i| packet[i] == capped[i]
                            || fields.iter().any(|field| field.contains(&i))),
                    "{packet:?}"
                );
                let recapped = parse_answer(&capped, &asked).expect("still an answer");
                assert_eq!(recapped.summary.ips, answer.summary.ips);
                assert_eq!(recapped.rcode, answer.rcode);
                assert!(recapped.longest_ttl <= 7, "{packet:?}");
            }
        }
        assert!(compared > 1_000, "only {compared} mutants compared");
    }

    /// The chain is scanned once per step: thousands of CNAMEs made an answer cost tens of
    /// milliseconds of a worker.
    #[test]
    fn an_answer_with_more_cnames_than_any_chain_is_refused() {
        let query = query_for(&name("www.cilium.io."), RecordType::A);
        let chain = |count: usize| {
            let mut records: Vec<HickoryRecord> = (0..count)
                .map(|n| cname(&format!("x{n}.www.cilium.io."), 60, "edge.cilium.io."))
                .collect();
            records.push(cname("www.cilium.io.", 60, "edge.cilium.io."));
            records.push(a("edge.cilium.io.", 60, 1));
            response_to(&query, records).to_vec().unwrap()
        };
        let asked = asked_bytes(&query);
        let fits = parse_answer(&chain(MAX_CNAME_RECORDS - 1), &asked).unwrap();
        assert_eq!(fits.summary.ips, vec![ip("198.18.1.1")]);
        assert_eq!(
            parse_answer(&chain(MAX_CNAME_RECORDS), &asked),
            Err(WireError::TooMany)
        );
    }

    #[test]
    fn repeated_addresses_go_and_the_order_stays() {
        let ip = |last: u8| IpAddr::from([198, 18, 0, last]);
        let mut few = vec![ip(3), ip(1), ip(3), ip(2), ip(1)];
        dedup_keeping_order(&mut few);
        assert_eq!(few, [ip(3), ip(1), ip(2)]);
        let mut many: Vec<IpAddr> = (0..200u8).map(|n| ip(n % 50)).collect();
        dedup_keeping_order(&mut many);
        assert_eq!(many, (0..50).map(ip).collect::<Vec<_>>());
    }
}
