//! ferry-linkem: a userspace link emulator for the ferry testbed.
//!
//! The kernel of the test hosts has no `sch_netem`, so delay and loss are emulated here:
//! one TUN device per network namespace, all joined in a star by this process, which
//! forwards IPv4 packets by destination address and shapes each direction of each pair of
//! hosts (rate, FIFO of one bandwidth-delay product, loss, one-way delay).
//!
//! The library holds the parts that need no network and are unit-tested on a fake clock:
//! [`profile`] (profiles and units), [`shape`] (token bucket, queue, delay line, loss) and
//! [`gso`] (virtio-net headers, TSO/USO super-packets and their split into segments).
//! The binary (`src/main.rs`) adds the TUN devices, namespaces, threads and signals.

pub mod gso;
pub mod profile;
pub mod shape;
