//! The rank mesh: how the parallel degrees lay ranks out, as xDiT does, and which ranks form the
//! group of each axis.
//!
//! Degrees dp (data), cfg (1 or 2), pp (PipeFusion), ulysses (U), ring (R) and tp (T), with
//! sp = U·R. Tensor parallelism varies fastest and data parallelism slowest:
//!
//! ```text
//! rank = tp_r + T·(sp_r + S·(pp_r + P·(cfg_r + C·dp_r)))
//! ulysses_r = sp_r mod U,  ring_r = sp_r div U        ("ulysses low")
//! ```

use std::fmt;

use crate::engine::ParallelConfig;
use crate::{Error, Result};

/// One axis of the mesh. `Sp` is the 2-D sequence-parallel axis that `Ulysses` and `Ring`
/// split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Axis {
    Dp,
    Cfg,
    Pp,
    Sp,
    Ulysses,
    Ring,
    Tp,
}

impl Axis {
    pub const ALL: [Axis; 7] = [
        Axis::Dp,
        Axis::Cfg,
        Axis::Pp,
        Axis::Sp,
        Axis::Ulysses,
        Axis::Ring,
        Axis::Tp,
    ];

    /// The lower-case name used in group names ("ulysses[0,2]").
    pub fn name(self) -> &'static str {
        match self {
            Axis::Dp => "dp",
            Axis::Cfg => "cfg",
            Axis::Pp => "pp",
            Axis::Sp => "sp",
            Axis::Ulysses => "ulysses",
            Axis::Ring => "ring",
            Axis::Tp => "tp",
        }
    }
}

impl fmt::Display for Axis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A rank's position on every axis. `sp` is always `ulysses + U·ring`; [`RankMesh::rank_of`]
/// checks that.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RankCoords {
    pub dp: usize,
    pub cfg: usize,
    pub pp: usize,
    pub sp: usize,
    pub ulysses: usize,
    pub ring: usize,
    pub tp: usize,
}

impl RankCoords {
    pub fn get(&self, axis: Axis) -> usize {
        match axis {
            Axis::Dp => self.dp,
            Axis::Cfg => self.cfg,
            Axis::Pp => self.pp,
            Axis::Sp => self.sp,
            Axis::Ulysses => self.ulysses,
            Axis::Ring => self.ring,
            Axis::Tp => self.tp,
        }
    }
}

/// The parallel degrees, validated, and the rank layout they imply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RankMesh {
    dp: usize,
    cfg: usize,
    pp: usize,
    ulysses: usize,
    ring: usize,
    tp: usize,
}

impl RankMesh {
    /// The mesh of `config`; every degree must be at least 1.
    pub fn new(config: &ParallelConfig) -> Result<Self> {
        let degrees = [
            ("--data-parallel-degree", config.data_parallel_degree),
            (
                "--pipefusion-parallel-degree",
                config.pipefusion_parallel_degree,
            ),
            ("--ulysses-degree", config.ulysses_degree),
            ("--ring-degree", config.ring_degree),
            ("--tensor-parallel-degree", config.tensor_parallel_degree),
        ];
        if let Some((flag, _)) = degrees.iter().find(|(_, d)| *d == 0) {
            return Err(Error::invalid(format!(
                "{flag} 0: every parallel degree must be at least 1 (1 turns the method off)"
            )));
        }
        Ok(Self {
            dp: config.data_parallel_degree,
            cfg: config.cfg_degree(),
            pp: config.pipefusion_parallel_degree,
            ulysses: config.ulysses_degree,
            ring: config.ring_degree,
            tp: config.tensor_parallel_degree,
        })
    }

    /// The mesh of `config` for a run of `world_size` ranks, which must be the product of the
    /// degrees.
    pub fn with_world_size(config: &ParallelConfig, world_size: usize) -> Result<Self> {
        let mesh = Self::new(config)?;
        if mesh.world_size() != world_size {
            return Err(Error::invalid(format!(
                "the parallel degrees ({}) need {} ranks but {world_size} were launched; change \
                 the degrees so that their product is {world_size}, or launch {} ranks",
                mesh.describe(),
                mesh.world_size(),
                mesh.world_size()
            )));
        }
        Ok(mesh)
    }

    /// "dp 2 × cfg 2 × ulysses 2", only the degrees above 1 ("serial" when all are 1).
    pub fn describe(&self) -> String {
        let parts: Vec<String> = [
            Axis::Dp,
            Axis::Cfg,
            Axis::Pp,
            Axis::Ulysses,
            Axis::Ring,
            Axis::Tp,
        ]
        .into_iter()
        .filter(|&a| self.degree(a) > 1)
        .map(|a| format!("{a} {}", self.degree(a)))
        .collect();
        if parts.is_empty() {
            "serial".to_string()
        } else {
            parts.join(" × ")
        }
    }

    pub fn world_size(&self) -> usize {
        self.dp * self.cfg * self.pp * self.sp_degree() * self.tp
    }

    pub fn sp_degree(&self) -> usize {
        self.ulysses * self.ring
    }

    pub fn degree(&self, axis: Axis) -> usize {
        match axis {
            Axis::Dp => self.dp,
            Axis::Cfg => self.cfg,
            Axis::Pp => self.pp,
            Axis::Sp => self.sp_degree(),
            Axis::Ulysses => self.ulysses,
            Axis::Ring => self.ring,
            Axis::Tp => self.tp,
        }
    }

    /// The coordinates of `rank`. Panics when `rank` is not below the world size.
    pub fn coords(&self, rank: usize) -> RankCoords {
        assert!(
            rank < self.world_size(),
            "rank {rank} out of range for a world of {} ranks",
            self.world_size()
        );
        let tp = rank % self.tp;
        let rest = rank / self.tp;
        let sp = rest % self.sp_degree();
        let rest = rest / self.sp_degree();
        let pp = rest % self.pp;
        let rest = rest / self.pp;
        let cfg = rest % self.cfg;
        let dp = rest / self.cfg;
        RankCoords {
            dp,
            cfg,
            pp,
            sp,
            ulysses: sp % self.ulysses,
            ring: sp / self.ulysses,
            tp,
        }
    }

    /// The rank at `coords`, read from dp, cfg, pp, ulysses, ring and tp; errors when a
    /// coordinate is out of range or `sp` disagrees with ulysses and ring.
    pub fn rank_of(&self, coords: &RankCoords) -> Result<usize> {
        for axis in Axis::ALL {
            if coords.get(axis) >= self.degree(axis) {
                return Err(Error::invalid(format!(
                    "{axis} coordinate {} out of range for degree {} in {coords:?}",
                    coords.get(axis),
                    self.degree(axis)
                )));
            }
        }
        let sp = coords.ulysses + self.ulysses * coords.ring;
        if coords.sp != sp {
            return Err(Error::invalid(format!(
                "sp coordinate {} disagrees with ulysses {} + {}·ring {} = {sp}",
                coords.sp, coords.ulysses, self.ulysses, coords.ring
            )));
        }
        Ok(self.rank_unchecked(coords.dp, coords.cfg, coords.pp, sp, coords.tp))
    }

    fn rank_unchecked(&self, dp: usize, cfg: usize, pp: usize, sp: usize, tp: usize) -> usize {
        tp + self.tp * (sp + self.sp_degree() * (pp + self.pp * (cfg + self.cfg * dp)))
    }

    /// The ranks that differ from `rank` only on `axis`, ordered by their coordinate on it
    /// (so a rank's index in the group is its coordinate). For `Sp` both the ulysses and the
    /// ring coordinate vary.
    pub fn group_ranks(&self, axis: Axis, rank: usize) -> Vec<usize> {
        let c = self.coords(rank);
        (0..self.degree(axis))
            .map(|i| {
                let (mut dp, mut cfg, mut pp, mut tp) = (c.dp, c.cfg, c.pp, c.tp);
                let (mut ulysses, mut ring) = (c.ulysses, c.ring);
                match axis {
                    Axis::Dp => dp = i,
                    Axis::Cfg => cfg = i,
                    Axis::Pp => pp = i,
                    Axis::Sp => (ulysses, ring) = (i % self.ulysses, i / self.ulysses),
                    Axis::Ulysses => ulysses = i,
                    Axis::Ring => ring = i,
                    Axis::Tp => tp = i,
                }
                self.rank_unchecked(dp, cfg, pp, ulysses + self.ulysses * ring, tp)
            })
            .collect()
    }

    /// Every group of `axis`, each ordered as [`group_ranks`](Self::group_ranks), the groups
    /// ordered by their lowest rank. They partition the world.
    pub fn groups(&self, axis: Axis) -> Vec<Vec<usize>> {
        let mut groups: Vec<Vec<usize>> = Vec::new();
        for rank in 0..self.world_size() {
            let group = self.group_ranks(axis, rank);
            if group[0] == rank {
                groups.push(group);
            }
        }
        groups
    }

    /// Checks the degrees against the model and the request, with messages that say what to
    /// change: the heads must split evenly over tp and then ulysses, pp cannot exceed the
    /// number of transformer blocks, and CFG parallel needs a request that uses
    /// classifier-free guidance (`cfg`: whether the pipeline decided it does, and if not, what
    /// would turn it on; see [`validate_for_cfg`](Self::validate_for_cfg)).
    pub fn validate_for_model(
        &self,
        num_attention_heads: usize,
        num_layers: usize,
        cfg: &CfgUse,
    ) -> Result<()> {
        self.validate_for_shape(num_attention_heads, num_layers)?;
        self.validate_for_cfg(cfg)
    }

    /// The part of [`validate_for_model`](Self::validate_for_model) that needs only the
    /// model's config, so that loaders can refuse a configuration before reading any weights.
    pub fn validate_for_shape(&self, num_attention_heads: usize, num_layers: usize) -> Result<()> {
        if !num_attention_heads.is_multiple_of(self.tp) {
            return Err(Error::invalid(format!(
                "--tensor-parallel-degree {} does not divide the {num_attention_heads} attention \
                 heads; use {}",
                self.tp,
                divisors_phrase(num_attention_heads)
            )));
        }
        let local_heads = num_attention_heads / self.tp;
        if !local_heads.is_multiple_of(self.ulysses) {
            let heads = if self.tp == 1 {
                format!("{num_attention_heads} attention heads")
            } else {
                format!(
                    "{local_heads} attention heads each tensor-parallel rank holds \
                     ({num_attention_heads} / --tensor-parallel-degree {})",
                    self.tp
                )
            };
            return Err(Error::invalid(format!(
                "--ulysses-degree {} does not divide the {heads}; use {}",
                self.ulysses,
                divisors_phrase(local_heads)
            )));
        }
        if self.pp > num_layers {
            return Err(Error::invalid(format!(
                "--pipefusion-parallel-degree {} exceeds the {num_layers} transformer blocks: \
                 every stage needs at least one; use at most {num_layers}",
                self.pp
            )));
        }
        Ok(())
    }

    /// CFG parallel splits the two halves of classifier-free guidance, so it needs a request
    /// that uses it. Whether one does is the pipeline's decision (PixArt, SD3: guidance scale
    /// above 1; Flux: a true-CFG scale with a negative prompt).
    pub fn validate_for_cfg(&self, cfg: &CfgUse) -> Result<()> {
        if let (2, CfgUse::Off { how_to_enable }) = (self.cfg, cfg) {
            return Err(Error::invalid(format!(
                "CFG parallel needs classifier-free guidance, which this request does not use: \
                 {how_to_enable}, or drop --use-cfg-parallel"
            )));
        }
        Ok(())
    }
}

/// Whether a request uses classifier-free guidance, as its pipeline decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CfgUse {
    On,
    /// Off; `how_to_enable` says what would turn it on (e.g. "raise --guidance-scale above 1
    /// (got 1)").
    Off {
        how_to_enable: String,
    },
}

impl CfgUse {
    pub fn is_on(&self) -> bool {
        matches!(self, CfgUse::On)
    }

    /// The rule of most diffusers pipelines (`do_classifier_free_guidance`): on when the
    /// guidance scale is above 1.
    pub fn from_guidance_scale(guidance_scale: f64) -> Self {
        if guidance_scale > 1.0 {
            CfgUse::On
        } else {
            CfgUse::Off {
                how_to_enable: format!("raise --guidance-scale above 1 (got {guidance_scale})"),
            }
        }
    }
}

/// "1, 2 or 4": the divisors of `n`.
fn divisors_phrase(n: usize) -> String {
    let divisors: Vec<String> = (1..=n)
        .filter(|&d| n.is_multiple_of(d))
        .map(|d| d.to_string())
        .collect();
    match divisors.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        Some((last, _)) => last.clone(),
        None => "a positive degree".to_string(),
    }
}

/// The name of a group: its axis and its members, "ulysses[0,2]".
pub fn group_name(prefix: &str, members: &[usize]) -> String {
    let members: Vec<String> = members.iter().map(|r| r.to_string()).collect();
    format!("{prefix}[{}]", members.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dp: usize, cfg: bool, pp: usize, u: usize, r: usize, tp: usize) -> ParallelConfig {
        ParallelConfig {
            data_parallel_degree: dp,
            use_cfg_parallel: cfg,
            pipefusion_parallel_degree: pp,
            ulysses_degree: u,
            ring_degree: r,
            tensor_parallel_degree: tp,
            ..Default::default()
        }
    }

    /// The layout formula, written out independently of `RankMesh`.
    fn formula(m: &RankMesh, c: &RankCoords) -> usize {
        let (t, s, p, cf) = (
            m.degree(Axis::Tp),
            m.degree(Axis::Sp),
            m.degree(Axis::Pp),
            m.degree(Axis::Cfg),
        );
        let sp = c.ulysses + m.degree(Axis::Ulysses) * c.ring;
        c.tp + t * (sp + s * (c.pp + p * (c.cfg + cf * c.dp)))
    }

    fn check_layout(m: &RankMesh) {
        for rank in 0..m.world_size() {
            let c = m.coords(rank);
            assert_eq!(formula(m, &c), rank, "{c:?}");
            assert_eq!(m.rank_of(&c).unwrap(), rank);
            assert_eq!(c.sp, c.ulysses + m.degree(Axis::Ulysses) * c.ring);
            for axis in Axis::ALL {
                let g = m.group_ranks(axis, rank);
                assert_eq!(g.len(), m.degree(axis));
                // This rank's index in the group is its coordinate on the axis.
                assert_eq!(g[c.get(axis)], rank, "{axis} {g:?}");
                for (i, &other) in g.iter().enumerate() {
                    let oc = m.coords(other);
                    assert_eq!(oc.get(axis), i);
                    for a in Axis::ALL {
                        let varies = a == axis
                            || (axis == Axis::Sp && matches!(a, Axis::Ulysses | Axis::Ring))
                            || (matches!(axis, Axis::Ulysses | Axis::Ring) && a == Axis::Sp);
                        if !varies {
                            assert_eq!(oc.get(a), c.get(a), "{axis} group differs on {a}");
                        }
                    }
                }
            }
        }
        for axis in Axis::ALL {
            let mut all: Vec<usize> = m.groups(axis).concat();
            all.sort();
            assert_eq!(all, (0..m.world_size()).collect::<Vec<_>>(), "{axis}");
        }
    }

    #[test]
    fn dp2_cfg2_u2_r2_layout_and_groups() {
        let m = RankMesh::new(&config(2, true, 1, 2, 2, 1)).unwrap();
        assert_eq!(m.world_size(), 16);
        check_layout(&m);
        assert_eq!(m.groups(Axis::Ulysses)[0], vec![0, 1]);
        assert_eq!(m.groups(Axis::Ring)[0], vec![0, 2]);
        assert_eq!(m.groups(Axis::Sp)[1], vec![4, 5, 6, 7]);
        assert_eq!(m.groups(Axis::Cfg)[0], vec![0, 4]);
        assert_eq!(m.groups(Axis::Dp)[3], vec![3, 11]);
        assert_eq!(m.groups(Axis::Tp)[5], vec![5]);
        let c = m.coords(13);
        assert_eq!(
            (c.dp, c.cfg, c.pp, c.sp, c.ulysses, c.ring, c.tp),
            (1, 1, 0, 1, 1, 0, 0)
        );
    }

    #[test]
    fn pp2_u2_layout_and_groups() {
        let m = RankMesh::new(&config(1, false, 2, 2, 1, 1)).unwrap();
        check_layout(&m);
        assert_eq!(m.groups(Axis::Pp), vec![vec![0, 2], vec![1, 3]]);
        assert_eq!(m.groups(Axis::Ulysses), vec![vec![0, 1], vec![2, 3]]);
        assert_eq!(
            m.groups(Axis::Ring),
            vec![vec![0], vec![1], vec![2], vec![3]]
        );
    }

    #[test]
    fn tp2_r2_layout_and_groups() {
        let m = RankMesh::new(&config(1, false, 1, 1, 2, 2)).unwrap();
        check_layout(&m);
        assert_eq!(m.groups(Axis::Tp), vec![vec![0, 1], vec![2, 3]]);
        assert_eq!(m.groups(Axis::Ring), vec![vec![0, 2], vec![1, 3]]);
        assert_eq!(m.groups(Axis::Sp), vec![vec![0, 2], vec![1, 3]]);
    }

    #[test]
    fn mixed_mesh_layout() {
        check_layout(&RankMesh::new(&config(1, true, 2, 3, 2, 2)).unwrap());
        check_layout(&RankMesh::new(&config(3, false, 1, 1, 1, 1)).unwrap());
        check_layout(&RankMesh::new(&ParallelConfig::default()).unwrap());
    }

    #[test]
    fn validation_messages_say_what_to_change() {
        let err = RankMesh::new(&config(1, false, 0, 1, 1, 1)).unwrap_err();
        assert!(
            err.to_string().contains("--pipefusion-parallel-degree 0"),
            "{err}"
        );

        let err = RankMesh::with_world_size(&config(2, true, 1, 2, 1, 1), 4).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("need 8 ranks but 4 were launched"), "{msg}");
        assert!(msg.contains("dp 2 × cfg 2 × ulysses 2"), "{msg}");
        RankMesh::with_world_size(&config(2, true, 1, 2, 1, 1), 8).unwrap();

        let m = RankMesh::new(&config(1, false, 1, 3, 1, 1)).unwrap();
        let msg = m
            .validate_for_model(4, 28, &CfgUse::On)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("--ulysses-degree 3 does not divide the 4 attention heads; use 1, 2 or 4"),
            "{msg}"
        );
        let m = RankMesh::new(&config(1, false, 1, 3, 1, 2)).unwrap();
        let msg = m
            .validate_for_model(16, 28, &CfgUse::On)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("8 attention heads each tensor-parallel rank"),
            "{msg}"
        );
        let m = RankMesh::new(&config(1, false, 1, 1, 1, 3)).unwrap();
        assert!(m.validate_for_model(16, 28, &CfgUse::On).is_err());

        let m = RankMesh::new(&config(1, true, 1, 1, 1, 1)).unwrap();
        let off = CfgUse::Off {
            how_to_enable: "raise --guidance-scale above 1 (got 1)".into(),
        };
        let msg = m.validate_for_model(16, 28, &off).unwrap_err().to_string();
        assert!(
            msg.contains("CFG parallel needs classifier-free guidance")
                && msg.contains("raise --guidance-scale above 1 (got 1), or drop --use-cfg"),
            "{msg}"
        );
        m.validate_for_model(16, 28, &CfgUse::On).unwrap();

        let m = RankMesh::new(&config(1, false, 4, 1, 1, 1)).unwrap();
        assert!(m.validate_for_model(16, 2, &CfgUse::On).is_err());
    }
}
