//! TSC frequency and TSC-based delays.
//!
//! Frequency sources, in order: hypervisor leaf 0x40000010 (EAX = TSC kHz), CPUID 0x15
//! (crystal ratio), KVM pvclock (`tsc_to_system_mul`/`tsc_shift`). Without any of them,
//! delays assume a conservative 5 GHz (waits are then at least as long as asked) and
//! `tsc_khz()` returns `None`.

use core::arch::x86_64::{__cpuid, _rdtsc};
use core::sync::atomic::{AtomicU64, Ordering};
use x86_64::registers::model_specific::Msr;

/// Assumed TSC kHz when it cannot be determined: high, so timeouts err on the long side.
const FALLBACK_KHZ: u64 = 5_000_000;
const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
const KVM_FEATURE_CLOCKSOURCE2: u32 = 1 << 3;

/// 0 = not yet measured, u64::MAX = unknown.
static TSC_KHZ: AtomicU64 = AtomicU64::new(0);

/// `struct pvclock_vcpu_time_info`.
#[repr(C, align(64))]
struct PvclockTimeInfo {
    version: u32,
    pad0: u32,
    tsc_timestamp: u64,
    system_time: u64,
    tsc_to_system_mul: u32,
    tsc_shift: i8,
    flags: u8,
    pad: [u8; 2],
}

static mut PVCLOCK: PvclockTimeInfo = PvclockTimeInfo {
    version: 0,
    pad0: 0,
    tsc_timestamp: 0,
    system_time: 0,
    tsc_to_system_mul: 0,
    tsc_shift: 0,
    flags: 0,
    pad: [0; 2],
};

/// Current TSC value.
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no memory effects; CR4.TSD is never set.
    unsafe { _rdtsc() }
}

fn cpuid(leaf: u32) -> (u32, u32, u32, u32) {
    let r = __cpuid(leaf);
    (r.eax, r.ebx, r.ecx, r.edx)
}

fn hypervisor_leaf_khz() -> Option<u64> {
    let (max, ..) = cpuid(0x4000_0000);
    if (0x4000_0010..0x4001_0000).contains(&max) {
        let (khz, ..) = cpuid(0x4000_0010);
        if khz != 0 {
            return Some(khz as u64);
        }
    }
    None
}

fn cpuid15_khz() -> Option<u64> {
    let (max, ..) = cpuid(0);
    if max < 0x15 {
        return None;
    }
    let (den, num, crystal_hz, _) = cpuid(0x15);
    if den == 0 || num == 0 || crystal_hz == 0 {
        return None;
    }
    Some(crystal_hz as u64 * num as u64 / den as u64 / 1000)
}

fn kvmclock_khz() -> Option<u64> {
    let (_, b, c, d) = cpuid(0x4000_0000);
    let sig = [b.to_le_bytes(), c.to_le_bytes(), d.to_le_bytes()];
    if sig.concat() != *b"KVMKVMKVM\0\0\0" {
        return None;
    }
    let (features, ..) = cpuid(0x4000_0001);
    if features & KVM_FEATURE_CLOCKSOURCE2 == 0 {
        return None;
    }
    let info = &raw mut PVCLOCK;
    let mut msr = Msr::new(MSR_KVM_SYSTEM_TIME_NEW);
    // SAFETY: the MSR is advertised (CLOCKSOURCE2); PVCLOCK is identity mapped, 64-byte
    // aligned and only written by the hypervisor while enabled; disabled again right after.
    let (mul, shift) = unsafe {
        msr.write(info as u64 | 1);
        let v = (&raw const (*info).tsc_to_system_mul).read_volatile();
        let s = (&raw const (*info).tsc_shift).read_volatile();
        msr.write(0);
        (v, s)
    };
    if mul == 0 {
        return None;
    }
    // ns = ((tsc << shift) * mul) >> 32  ⇒  kHz = 1e6 * 2^32 / (mul * 2^shift)
    let num: u128 = 1_000_000u128 << 32;
    let khz = if shift >= 0 {
        num / ((mul as u128) << shift)
    } else {
        (num << (-shift)) / mul as u128
    };
    Some(khz as u64)
}

/// TSC frequency in kHz, if the platform tells it.
pub fn tsc_khz() -> Option<u64> {
    match TSC_KHZ.load(Ordering::Relaxed) {
        0 => {
            let khz = hypervisor_leaf_khz()
                .or_else(cpuid15_khz)
                .or_else(kvmclock_khz);
            TSC_KHZ.store(khz.unwrap_or(u64::MAX), Ordering::Relaxed);
            khz
        }
        u64::MAX => None,
        khz => Some(khz),
    }
}

/// TSC ticks for `us` microseconds (conservative when the frequency is unknown).
pub fn ticks_for_us(us: u64) -> u64 {
    tsc_khz().unwrap_or(FALLBACK_KHZ) * us / 1000
}

/// Milliseconds for `ticks` TSC ticks (None if the frequency is unknown).
pub fn ticks_to_ms(ticks: u64) -> Option<u64> {
    tsc_khz().map(|khz| ticks / khz)
}

/// Busy-waits at least `us` microseconds.
pub fn delay_us(us: u64) {
    let end = rdtsc() + ticks_for_us(us);
    while rdtsc() < end {
        core::hint::spin_loop();
    }
}
