//! A minimal reader for the BTF of an ELF object: struct layouts and enum
//! values, enough to check the Rust ABI mirrors against the C headers.

use std::collections::BTreeMap;

use object::{Object, ObjectSection};

const BTF_MAGIC: u16 = 0xeb9f;
const BTF_SECTION: &str = ".BTF";

const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_ENUM64: u32 = 19;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("object is not a readable ELF file: {0}")]
    Elf(#[from] object::Error),
    #[error("object has no {BTF_SECTION} section: was it compiled with -g?")]
    NoBtf,
    #[error("BTF is malformed at byte {at}: {what}")]
    Malformed { at: usize, what: &'static str },
}

/// A struct's size and its members' byte offsets, in declaration order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StructLayout {
    pub size: u32,
    pub members: Vec<(String, u32)>,
}

/// What the tests need from an object's BTF.
#[derive(Debug, Default)]
pub struct Btf {
    pub structs: BTreeMap<String, StructLayout>,
    pub enums: BTreeMap<String, Vec<(String, i64)>>,
}

// === impl Btf ===

impl Btf {
    /// Reads the `.BTF` section of an ELF object.
    pub fn from_elf(elf: &[u8]) -> Result<Self, BtfError> {
        let file = object::File::parse(elf)?;
        let section = file.section_by_name(BTF_SECTION).ok_or(BtfError::NoBtf)?;
        Self::parse(section.data()?)
    }

    pub fn parse(raw: &[u8]) -> Result<Self, BtfError> {
        let r = Reader { raw };
        if r.u16(0)? != BTF_MAGIC {
            // Objects for another endianness are not ours to check.
            return Err(BtfError::Malformed { at: 0, what: "bad magic" });
        }
        let hdr_len = r.u32(4)? as usize;
        let (type_off, type_len) = (r.u32(8)? as usize, r.u32(12)? as usize);
        let str_off = r.u32(16)? as usize;
        let types = hdr_len + type_off;
        let strings = hdr_len + str_off;
        let name = |off: u32| -> Result<String, BtfError> {
            let start = strings + off as usize;
            let bytes = raw.get(start..).ok_or(BtfError::Malformed { at: start, what: "string offset" })?;
            let end = bytes.iter().position(|&b| b == 0).ok_or(BtfError::Malformed { at: start, what: "unterminated string" })?;
            Ok(String::from_utf8_lossy(&bytes[..end]).into_owned())
        };

        let mut btf = Self::default();
        let mut at = types;
        while at < types + type_len {
            let (name_off, info, size) = (r.u32(at)?, r.u32(at + 4)?, r.u32(at + 8)?);
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let kflag = info >> 31 == 1;
            at += 12;
            match kind {
                KIND_STRUCT | KIND_UNION => {
                    let mut members = Vec::with_capacity(vlen);
                    for i in 0..vlen {
                        let m = at + i * 12;
                        let offset = r.u32(m + 8)?;
                        let bits = if kflag { offset & 0x00ff_ffff } else { offset };
                        members.push((name(r.u32(m)?)?, bits / 8));
                    }
                    at += vlen * 12;
                    if kind == KIND_STRUCT && name_off != 0 {
                        btf.structs.insert(name(name_off)?, StructLayout { size, members });
                    }
                }
                KIND_ENUM => {
                    let mut values = Vec::with_capacity(vlen);
                    for i in 0..vlen {
                        let e = at + i * 8;
                        values.push((name(r.u32(e)?)?, r.u32(e + 4)? as i32 as i64));
                    }
                    at += vlen * 8;
                    if name_off != 0 {
                        btf.enums.insert(name(name_off)?, values);
                    }
                }
                KIND_ENUM64 => {
                    let mut values = Vec::with_capacity(vlen);
                    for i in 0..vlen {
                        let e = at + i * 12;
                        let v = u64::from(r.u32(e + 4)?) | (u64::from(r.u32(e + 8)?) << 32);
                        values.push((name(r.u32(e)?)?, v as i64));
                    }
                    at += vlen * 12;
                    if name_off != 0 {
                        btf.enums.insert(name(name_off)?, values);
                    }
                }
                KIND_INT | KIND_VAR | KIND_DECL_TAG => at += 4,
                KIND_ARRAY => at += 12,
                KIND_FUNC_PROTO => at += vlen * 8,
                KIND_DATASEC => at += vlen * 12,
                // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG
                2 | 7..=12 | 16 | 18 => {}
                _ => return Err(BtfError::Malformed { at, what: "unknown type kind" }),
            }
        }
        Ok(btf)
    }
}

struct Reader<'a> {
    raw: &'a [u8],
}

impl Reader<'_> {
    fn u16(&self, at: usize) -> Result<u16, BtfError> {
        let b = self.raw.get(at..at + 2).ok_or(BtfError::Malformed { at, what: "truncated" })?;
        Ok(u16::from_ne_bytes([b[0], b[1]]))
    }

    fn u32(&self, at: usize) -> Result<u32, BtfError> {
        let b = self.raw.get(at..at + 4).ok_or(BtfError::Malformed { at, what: "truncated" })?;
        Ok(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
    }
}
