//! Percentiles and medians of measurements.

/// Raw measurements (microseconds or any unit), summarised on demand.
#[derive(Debug, Default, Clone)]
pub struct Samples(Vec<u64>);

impl Samples {
    pub fn push(&mut self, v: u64) {
        self.0.push(v);
    }

    pub fn extend(&mut self, v: impl IntoIterator<Item = u64>) {
        self.0.extend(v);
    }

    pub fn extend_from(&mut self, other: &Samples) {
        self.0.extend_from_slice(&other.0);
    }

    /// The nearest-rank percentile `p` (0–100); 0 when empty.
    pub fn percentile(&self, p: f64) -> u64 {
        if self.0.is_empty() {
            return 0;
        }
        let mut sorted = self.0.clone();
        sorted.sort_unstable();
        let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
        sorted[rank.clamp(1, sorted.len()) - 1]
    }

    pub fn count(&self) -> usize {
        self.0.len()
    }

    pub fn max(&self) -> u64 {
        self.0.iter().copied().max().unwrap_or(0)
    }
}

/// The median of repeated figures (the middle one; the lower of the two
/// middle ones for an even count).
pub fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[(sorted.len() - 1) / 2]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_take_the_nearest_rank() {
        let mut s = Samples::default();
        s.extend(1..=100);
        assert_eq!(s.percentile(50.0), 50);
        assert_eq!(s.percentile(99.0), 99);
        assert_eq!(s.percentile(99.9), 100);
        assert_eq!(s.max(), 100);
        assert_eq!(Samples::default().percentile(50.0), 0);
    }

    #[test]
    fn medians_ignore_outliers() {
        assert_eq!(median(&[3.0, 1.0, 1000.0]), 3.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.0);
    }
}
