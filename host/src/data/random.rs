//! CPython's `random` module, bit for bit, for the calls calibration sampling makes.
//!
//! MT19937 as in CPython's `Modules/_randommodule.c`: `random.seed(n)` for an int `n` runs
//! `init_by_array` on `abs(n)` split into 32-bit words, least significant first (`n = 0` →
//! key `[0]`); `getrandbits(k)` for `k <= 32` is `genrand_uint32() >> (32 - k)`, and for
//! larger `k` fills 32-bit words from the least significant one, dropping the low bits of the
//! last (most significant) word; `randint(a, b)` is `a + _randbelow(b - a + 1)` where
//! `_randbelow(n)` draws `getrandbits(n.bit_length())` until the value is below `n`.

const N: usize = 624;
const M: usize = 397;
const MATRIX_A: u32 = 0x9908_b0df;
const UPPER_MASK: u32 = 0x8000_0000;
const LOWER_MASK: u32 = 0x7fff_ffff;

/// A Mersenne Twister producing the same stream as Python's `random` after `random.seed(seed)`.
#[derive(Clone)]
pub struct PyRandom {
    state: [u32; N],
    index: usize,
}

impl std::fmt::Debug for PyRandom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PyRandom")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl PyRandom {
    /// The state after Python's `random.seed(seed)`.
    pub fn new(seed: u64) -> Self {
        // abs(seed) as 32-bit words, least significant first, without leading zero words
        // (CPython sizes the key by the seed's bit length; 0 still gives one word).
        let key: &[u32] = &[seed as u32, (seed >> 32) as u32];
        let key = if seed >> 32 == 0 { &key[..1] } else { key };
        let mut rng = PyRandom {
            state: [0; N],
            index: N,
        };
        rng.init_by_array(key);
        rng
    }

    fn init_genrand(&mut self, s: u32) {
        let mt = &mut self.state;
        mt[0] = s;
        for i in 1..N {
            mt[i] = 1_812_433_253u32
                .wrapping_mul(mt[i - 1] ^ (mt[i - 1] >> 30))
                .wrapping_add(i as u32);
        }
        self.index = N;
    }

    fn init_by_array(&mut self, key: &[u32]) {
        self.init_genrand(19_650_218);
        let mt = &mut self.state;
        let (mut i, mut j) = (1usize, 0usize);
        for _ in 0..N.max(key.len()) {
            mt[i] = (mt[i] ^ (mt[i - 1] ^ (mt[i - 1] >> 30)).wrapping_mul(1_664_525))
                .wrapping_add(key[j])
                .wrapping_add(j as u32);
            i += 1;
            j += 1;
            if i >= N {
                mt[0] = mt[N - 1];
                i = 1;
            }
            if j >= key.len() {
                j = 0;
            }
        }
        for _ in 0..N - 1 {
            mt[i] = (mt[i] ^ (mt[i - 1] ^ (mt[i - 1] >> 30)).wrapping_mul(1_566_083_941))
                .wrapping_sub(i as u32);
            i += 1;
            if i >= N {
                mt[0] = mt[N - 1];
                i = 1;
            }
        }
        mt[0] = 0x8000_0000; // MSB set: the state is never all zero.
    }

    /// The next 32-bit output (CPython's `genrand_uint32`).
    pub fn genrand_uint32(&mut self) -> u32 {
        if self.index >= N {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }

    fn twist(&mut self) {
        let mt = &mut self.state;
        let mag01 = |y: u32| if y & 1 == 0 { 0 } else { MATRIX_A };
        for kk in 0..N {
            let y = (mt[kk] & UPPER_MASK) | (mt[(kk + 1) % N] & LOWER_MASK);
            mt[kk] = mt[(kk + M) % N] ^ (y >> 1) ^ mag01(y);
        }
        self.index = 0;
    }

    /// Python's `getrandbits(k)` for `k <= 64`; `None` for larger `k` (not needed: windows
    /// are indexed by `usize`).
    pub fn getrandbits(&mut self, k: u32) -> Option<u64> {
        match k {
            0 => Some(0),
            1..=32 => Some(u64::from(self.genrand_uint32() >> (32 - k))),
            33..=64 => {
                // Least significant word first; the last word keeps its top `k - 32` bits.
                let low = u64::from(self.genrand_uint32());
                let high = u64::from(self.genrand_uint32() >> (64 - k));
                Some(low | (high << 32))
            }
            _ => None,
        }
    }

    /// Python's `_randbelow(n)`: uniform in `0..n`; 0 when `n == 0` (Python never asks).
    pub fn randbelow(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        let k = u64::BITS - n.leading_zeros(); // n.bit_length(), 1..=64
        loop {
            // k <= 64, so getrandbits always answers.
            let r = self.getrandbits(k).unwrap_or(0);
            if r < n {
                return r;
            }
        }
    }

    /// Python's `randint(a, b)`: uniform in `a..=b`; `None` when `a > b` (Python raises
    /// `ValueError`) or when `b - a + 1` overflows `u64` (`a = 0, b = u64::MAX`).
    pub fn randint(&mut self, a: u64, b: u64) -> Option<u64> {
        let width = b.checked_sub(a)?.checked_add(1)?;
        Some(a + self.randbelow(width))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Reference values from CPython 3.11.7 on this machine, e.g.
    // python3 -c "import random; random.seed(0); print([random.getrandbits(32) for _ in range(5)])"

    #[test]
    fn seed_0_getrandbits_32_matches_cpython() {
        let mut r = PyRandom::new(0);
        let got: Vec<u64> = (0..5).map(|_| r.getrandbits(32).unwrap()).collect();
        assert_eq!(
            got,
            [3626764237, 1654615998, 3255389356, 3823568514, 1806341205]
        );
    }

    #[test]
    fn the_state_regenerates_like_cpython_after_624_draws() {
        // random.seed(0); [random.getrandbits(32) for _ in range(625)][-2:]
        let mut r = PyRandom::new(0);
        let got: Vec<u32> = (0..625).map(|_| r.genrand_uint32()).collect();
        assert_eq!(got[623..], [2390040247, 2229104038]);
    }

    #[test]
    fn wide_and_narrow_getrandbits_match_cpython() {
        // random.seed(0); print(random.getrandbits(64), random.getrandbits(40),
        //                       random.getrandbits(1), random.getrandbits(0))
        let mut r = PyRandom::new(0);
        assert_eq!(r.getrandbits(64), Some(7106521602475165645));
        assert_eq!(r.getrandbits(40), Some(978212965548));
        assert_eq!(r.getrandbits(1), Some(0));
        assert_eq!(r.getrandbits(0), Some(0));
        assert_eq!(r.getrandbits(65), None);
    }

    #[test]
    fn multi_word_seeds_match_cpython() {
        // random.seed(2**40+5) / random.seed(2**64-1); [random.getrandbits(32) for _ in range(3)]
        let mut r = PyRandom::new((1 << 40) + 5);
        let got: Vec<u32> = (0..3).map(|_| r.genrand_uint32()).collect();
        assert_eq!(got, [2166296868, 2220160828, 1153647273]);
        let mut r = PyRandom::new(u64::MAX);
        let got: Vec<u32> = (0..3).map(|_| r.genrand_uint32()).collect();
        assert_eq!(got, [93740670, 1068495656, 1452108352]);
    }

    #[test]
    fn randint_matches_cpython() {
        // random.seed(12345); [random.randint(0, 100642) for _ in range(5)],
        // [random.randint(0, 0) for _ in range(2)], random.randint(0, 2**40),
        // random.randint(7, 2**64-1)
        let mut r = PyRandom::new(12345);
        let got: Vec<u64> = (0..5).map(|_| r.randint(0, 100_642).unwrap()).collect();
        assert_eq!(got, [54607, 96034, 1332, 39143, 48288]);
        assert_eq!(r.randint(0, 0), Some(0));
        assert_eq!(r.randint(0, 0), Some(0));
        assert_eq!(r.randint(0, 1 << 40), Some(960208693573));
        assert_eq!(r.randint(7, u64::MAX), Some(6881813287187799954));
        assert_eq!(r.randint(3, 2), None);
        assert_eq!(r.randint(0, u64::MAX), None);
    }
}
