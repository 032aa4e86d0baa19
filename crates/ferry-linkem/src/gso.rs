//! Packets as a TUN device with `IFF_VNET_HDR` hands them over: a 10-byte
//! `virtio_net_hdr` followed by an IPv4 packet that may be a TSO/USO super-packet (up to
//! 64 KiB carrying many MSS-sized segments). Here: reading the header, counting segments,
//! and splitting a super-packet into its segments (needed only when loss hits some of them).

/// Size of `struct virtio_net_hdr` (no `num_buffers`).
pub const VNET_HDR_LEN: usize = 10;

pub const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
pub const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;
pub const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;
pub const VIRTIO_NET_HDR_GSO_UDP_L4: u8 = 5;
pub const VIRTIO_NET_HDR_GSO_ECN: u8 = 0x80;

const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;

/// `struct virtio_net_hdr` (little-endian fields, as TUN uses on x86).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHdr {
    pub fn parse(b: &[u8]) -> Option<VnetHdr> {
        if b.len() < VNET_HDR_LEN {
            return None;
        }
        let u = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Some(VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
        })
    }

    pub fn write(&self, b: &mut [u8]) {
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
    }

    /// GSO type without the ECN bit.
    pub fn gso_kind(&self) -> u8 {
        self.gso_type & !VIRTIO_NET_HDR_GSO_ECN
    }
}

/// Destination of an IPv4 packet, or `None` if it is not IPv4 (or too short).
pub fn ipv4_dst(ip: &[u8]) -> Option<[u8; 4]> {
    if ip.len() < 20 || ip[0] >> 4 != 4 {
        return None;
    }
    Some([ip[16], ip[17], ip[18], ip[19]])
}

/// Length of the IPv4 + transport headers of a super-packet, if it is one we can split.
fn headers_len(hdr: &VnetHdr, ip: &[u8]) -> Option<(usize, usize)> {
    if ip.len() < 20 || ip[0] >> 4 != 4 {
        return None;
    }
    let ihl = (ip[0] & 0x0f) as usize * 4;
    if ihl < 20 || ip.len() < ihl + 8 {
        return None;
    }
    let l4 = match (hdr.gso_kind(), ip[9]) {
        (VIRTIO_NET_HDR_GSO_TCPV4, PROTO_TCP) => {
            if ip.len() < ihl + 20 {
                return None;
            }
            let thl = (ip[ihl + 12] >> 4) as usize * 4;
            if thl < 20 || ip.len() < ihl + thl {
                return None;
            }
            thl
        }
        (VIRTIO_NET_HDR_GSO_UDP_L4, PROTO_UDP) => 8,
        _ => return None,
    };
    Some((ihl, l4))
}

/// What a packet costs on a real wire: its segment count and its bytes (IP packets; a
/// super-packet of `n` segments carries its headers `n` times on the wire).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WireSize {
    pub segments: u32,
    pub bytes: u64,
}

/// Segment count and wire bytes of an IPv4 packet with its virtio header.
pub fn wire_size(hdr: &VnetHdr, ip: &[u8]) -> WireSize {
    let single = WireSize {
        segments: 1,
        bytes: ip.len() as u64,
    };
    if hdr.gso_kind() == VIRTIO_NET_HDR_GSO_NONE || hdr.gso_size == 0 {
        return single;
    }
    let Some((ihl, l4)) = headers_len(hdr, ip) else {
        return single;
    };
    let h = ihl + l4;
    let payload = ip.len().saturating_sub(h);
    let n = payload.div_ceil(hdr.gso_size as usize).max(1);
    WireSize {
        segments: n as u32,
        bytes: (payload + n * h) as u64,
    }
}

/// Internet checksum accumulation (ones' complement sum, not folded).
fn sum16(data: &[u8], mut acc: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u16::from_be_bytes([c[0], c[1]]) as u32;
        // Fold early so the accumulator never overflows on 64 KiB inputs.
        if acc & 0x8000_0000 != 0 {
            acc = (acc & 0xffff) + (acc >> 16);
        }
    }
    if let [b] = chunks.remainder() {
        acc += (*b as u32) << 8;
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The IPv4 header checksum of `hdr` (with its checksum field taken as zero).
pub fn ipv4_header_checksum(hdr: &[u8]) -> u16 {
    let acc = sum16(&hdr[..10], 0);
    let acc = sum16(&hdr[12..], acc);
    !fold(acc)
}

/// Ones' complement sum of the TCP/UDP pseudo-header, folded, not inverted: what Linux puts
/// in the checksum field of a packet whose checksum the device completes (`NEEDS_CSUM`).
fn pseudo_header_sum(src: &[u8], dst: &[u8], proto: u8, l4_len: usize) -> u16 {
    let acc = sum16(src, 0);
    let acc = sum16(dst, acc);
    fold(acc + proto as u32 + l4_len as u32)
}

/// Full transport checksum of a segment (for tests and for checking a split): the value
/// that belongs in the checksum field.
pub fn transport_checksum(ip: &[u8]) -> u16 {
    let ihl = (ip[0] & 0x0f) as usize * 4;
    let l4 = &ip[ihl..];
    let csum_at = if ip[9] == PROTO_TCP { 16 } else { 6 };
    let mut acc = sum16(&ip[12..16], 0);
    acc = sum16(&ip[16..20], acc);
    acc += ip[9] as u32 + l4.len() as u32;
    acc = sum16(&l4[..csum_at], acc);
    acc = sum16(&l4[csum_at + 2..], acc);
    !fold(acc)
}

/// Splits a TSO (TCP/IPv4) or USO (UDP/IPv4) super-packet into its segments, as the
/// kernel's GSO would: per segment the IPv4 total length, id (incremented) and header
/// checksum, the TCP sequence number and flags (FIN/PSH on the last segment only, CWR on
/// the first only) or the UDP length. Each segment gets a `virtio_net_hdr` asking the
/// receiving device to complete the transport checksum (`NEEDS_CSUM`, the pseudo-header sum
/// in the checksum field), like the super-packet had.
///
/// `emit(index, segment)` is called per segment with the header + packet bytes of that
/// segment in a scratch buffer. Returns `None` (and emits nothing) if the packet is not a
/// super-packet this function understands.
pub fn split_segments(pkt: &[u8], mut emit: impl FnMut(u32, &[u8])) -> Option<u32> {
    let hdr = VnetHdr::parse(pkt)?;
    let ip = &pkt[VNET_HDR_LEN..];
    let mss = hdr.gso_size as usize;
    if mss == 0 {
        return None;
    }
    let (ihl, l4) = headers_len(&hdr, ip)?;
    let h = ihl + l4;
    let total = (u16::from_be_bytes([ip[2], ip[3]]) as usize).clamp(h, ip.len());
    let payload = &ip[h..total];
    let n = payload.len().div_ceil(mss).max(1);
    let is_tcp = ip[9] == PROTO_TCP;
    let id0 = u16::from_be_bytes([ip[4], ip[5]]);
    let seq0 = if is_tcp {
        u32::from_be_bytes([ip[ihl + 4], ip[ihl + 5], ip[ihl + 6], ip[ihl + 7]])
    } else {
        0
    };
    let mut seg = vec![0u8; VNET_HDR_LEN + h + mss];
    for i in 0..n {
        let body = &payload[(i * mss).min(payload.len())..((i + 1) * mss).min(payload.len())];
        let len = h + body.len();
        let out = &mut seg[..VNET_HDR_LEN + len];
        VnetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            gso_type: VIRTIO_NET_HDR_GSO_NONE,
            hdr_len: h as u16,
            gso_size: 0,
            csum_start: ihl as u16,
            csum_offset: if is_tcp { 16 } else { 6 },
        }
        .write(&mut out[..VNET_HDR_LEN]);
        let o = &mut out[VNET_HDR_LEN..];
        o[..h].copy_from_slice(&ip[..h]);
        o[h..].copy_from_slice(body);
        // IPv4: total length, id, checksum.
        o[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        o[4..6].copy_from_slice(&id0.wrapping_add(i as u16).to_be_bytes());
        o[10..12].copy_from_slice(&[0, 0]);
        let c = ipv4_header_checksum(&o[..ihl]);
        o[10..12].copy_from_slice(&c.to_be_bytes());
        let l4_len = len - ihl;
        if is_tcp {
            let seq = seq0.wrapping_add((i * mss) as u32);
            o[ihl + 4..ihl + 8].copy_from_slice(&seq.to_be_bytes());
            let flags = &mut o[ihl + 13];
            if i + 1 < n {
                *flags &= !(0x01 | 0x08); // FIN, PSH
            }
            if i > 0 {
                *flags &= !0x80; // CWR
            }
            let p = pseudo_header_sum(&ip[12..16], &ip[16..20], PROTO_TCP, l4_len);
            o[ihl + 16..ihl + 18].copy_from_slice(&p.to_be_bytes());
        } else {
            o[ihl + 4..ihl + 6].copy_from_slice(&(l4_len as u16).to_be_bytes());
            let p = pseudo_header_sum(&ip[12..16], &ip[16..20], PROTO_UDP, l4_len);
            o[ihl + 6..ihl + 8].copy_from_slice(&p.to_be_bytes());
        }
        emit(i as u32, out);
    }
    Some(n as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TCP/IPv4 super-packet with `payload` bytes, MSS `mss`.
    fn tcp_super(payload: usize, mss: u16, tcp_flags: u8) -> Vec<u8> {
        let thl = 32; // with timestamps option
        let len = 20 + thl + payload;
        let mut p = vec![0u8; VNET_HDR_LEN + len];
        VnetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            gso_type: VIRTIO_NET_HDR_GSO_TCPV4,
            hdr_len: (20 + thl) as u16,
            gso_size: mss,
            csum_start: 20,
            csum_offset: 16,
        }
        .write(&mut p);
        let ip = &mut p[VNET_HDR_LEN..];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        ip[4..6].copy_from_slice(&0xfffeu16.to_be_bytes());
        ip[6] = 0x40; // DF
        ip[8] = 64;
        ip[9] = PROTO_TCP;
        ip[12..16].copy_from_slice(&[10, 77, 0, 1]);
        ip[16..20].copy_from_slice(&[10, 77, 0, 2]);
        let c = ipv4_header_checksum(&ip[..20]);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        let t = &mut ip[20..];
        t[0..2].copy_from_slice(&5201u16.to_be_bytes());
        t[2..4].copy_from_slice(&40000u16.to_be_bytes());
        t[4..8].copy_from_slice(&0xffff_f000u32.to_be_bytes()); // wraps during the split
        t[12] = ((thl / 4) as u8) << 4;
        t[13] = tcp_flags;
        for (i, b) in ip[20 + thl..].iter_mut().enumerate() {
            *b = (i * 7 % 251) as u8;
        }
        p
    }

    fn udp_super(payload: usize, seg: u16) -> Vec<u8> {
        let len = 28 + payload;
        let mut p = vec![0u8; VNET_HDR_LEN + len];
        VnetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            gso_type: VIRTIO_NET_HDR_GSO_UDP_L4,
            hdr_len: 28,
            gso_size: seg,
            csum_start: 20,
            csum_offset: 6,
        }
        .write(&mut p);
        let ip = &mut p[VNET_HDR_LEN..];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        ip[8] = 64;
        ip[9] = PROTO_UDP;
        ip[12..16].copy_from_slice(&[10, 77, 0, 2]);
        ip[16..20].copy_from_slice(&[10, 77, 0, 1]);
        ip[20..22].copy_from_slice(&7711u16.to_be_bytes());
        ip[22..24].copy_from_slice(&7711u16.to_be_bytes());
        ip[24..26].copy_from_slice(&((8 + payload) as u16).to_be_bytes());
        for (i, b) in ip[28..].iter_mut().enumerate() {
            *b = (i % 253) as u8;
        }
        p
    }

    #[test]
    fn header_round_trip() {
        let h = VnetHdr {
            flags: 1,
            gso_type: 0x81,
            hdr_len: 52,
            gso_size: 1448,
            csum_start: 20,
            csum_offset: 16,
        };
        let mut b = [0u8; VNET_HDR_LEN];
        h.write(&mut b);
        assert_eq!(VnetHdr::parse(&b), Some(h));
        assert_eq!(h.gso_kind(), VIRTIO_NET_HDR_GSO_TCPV4);
        assert_eq!(VnetHdr::parse(&b[..9]), None);
    }

    #[test]
    fn ipv4_header_checksum_known_value() {
        // Example header from RFC 1071 discussions (checksum 0xb861).
        let h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(ipv4_header_checksum(&h), 0xb861);
    }

    #[test]
    fn wire_size_counts_segments_and_headers() {
        let p = tcp_super(10 * 1448 + 100, 1448, 0x18);
        let h = VnetHdr::parse(&p).unwrap();
        let w = wire_size(&h, &p[VNET_HDR_LEN..]);
        assert_eq!(w.segments, 11);
        assert_eq!(w.bytes, (10 * 1448 + 100 + 11 * 52) as u64);
        // A plain packet is one segment.
        let plain = VnetHdr::default();
        assert_eq!(
            wire_size(&plain, &[0x45; 60]),
            WireSize {
                segments: 1,
                bytes: 60
            }
        );
        assert_eq!(ipv4_dst(&p[VNET_HDR_LEN..]), Some([10, 77, 0, 2]));
        assert_eq!(ipv4_dst(&[0x60; 40]), None, "IPv6 is not forwarded");
    }

    #[test]
    fn tcp_split_rebuilds_the_stream() {
        let payload = 5 * 1448 + 17;
        let p = tcp_super(payload, 1448, 0x80 | 0x18 | 0x01); // CWR PSH ACK FIN
        let orig_payload = p[VNET_HDR_LEN + 52..].to_vec();
        let mut got = Vec::new();
        let mut segs = Vec::new();
        let n = split_segments(&p, |i, s| {
            segs.push((i, s.to_vec()));
        })
        .unwrap();
        assert_eq!(n, 6);
        for (i, s) in &segs {
            let h = VnetHdr::parse(s).unwrap();
            assert_eq!(h.gso_type, VIRTIO_NET_HDR_GSO_NONE);
            assert_eq!(h.flags, VIRTIO_NET_HDR_F_NEEDS_CSUM);
            assert_eq!((h.csum_start, h.csum_offset), (20, 16));
            let ip = &s[VNET_HDR_LEN..];
            let len = u16::from_be_bytes([ip[2], ip[3]]) as usize;
            assert_eq!(len, ip.len());
            assert_eq!(len, 52 + if *i < 5 { 1448 } else { 17 });
            assert_eq!(
                ipv4_header_checksum(&ip[..20]),
                u16::from_be_bytes([ip[10], ip[11]])
            );
            assert_eq!(
                u16::from_be_bytes([ip[4], ip[5]]),
                0xfffeu16.wrapping_add(*i as u16)
            );
            let seq = u32::from_be_bytes([ip[24], ip[25], ip[26], ip[27]]);
            assert_eq!(seq, 0xffff_f000u32.wrapping_add(*i * 1448));
            let flags = ip[33];
            assert_eq!(flags & 0x80 != 0, *i == 0, "CWR only first");
            assert_eq!(flags & 0x09 != 0, *i == 5, "FIN/PSH only last");
            assert_eq!(flags & 0x08 != 0, *i == 5);
            assert!(flags & 0x10 != 0, "ACK everywhere");
            // The checksum field holds the pseudo-header sum: completing the sum over the
            // segment from csum_start gives the full checksum.
            let mut full = ip.to_vec();
            let pseudo = u16::from_be_bytes([ip[36], ip[37]]);
            full[36] = 0;
            full[37] = 0;
            let expect = transport_checksum(&full);
            let completed = !fold(sum16(&ip[20..36], pseudo as u32) + sum16(&ip[38..], 0));
            assert_eq!(completed, expect);
            got.extend_from_slice(&ip[52..]);
        }
        assert_eq!(got, orig_payload);
    }

    #[test]
    fn udp_split_gives_datagrams() {
        let p = udp_super(3 * 1200 + 5, 1200);
        let mut sizes = Vec::new();
        let mut data = Vec::new();
        let n = split_segments(&p, |_, s| {
            let ip = &s[VNET_HDR_LEN..];
            assert_eq!(
                u16::from_be_bytes([ip[24], ip[25]]) as usize,
                ip.len() - 20,
                "UDP length"
            );
            assert_eq!(
                ipv4_header_checksum(&ip[..20]),
                u16::from_be_bytes([ip[10], ip[11]])
            );
            sizes.push(ip.len());
            data.extend_from_slice(&ip[28..]);
        })
        .unwrap();
        assert_eq!(n, 4);
        assert_eq!(sizes, vec![1228, 1228, 1228, 33]);
        assert_eq!(data, p[VNET_HDR_LEN + 28..].to_vec());
    }

    #[test]
    fn split_refuses_what_it_does_not_know() {
        let mut p = tcp_super(3000, 1448, 0x10);
        p[1] = VIRTIO_NET_HDR_GSO_NONE;
        assert_eq!(split_segments(&p, |_, _| panic!("emitted")), None);
        let mut p = tcp_super(3000, 1448, 0x10);
        p[VNET_HDR_LEN + 9] = PROTO_UDP; // header says TCP GSO, packet is UDP
        assert_eq!(split_segments(&p, |_, _| panic!("emitted")), None);
        assert_eq!(split_segments(&p[..12], |_, _| panic!("emitted")), None);
    }
}
