//! The fuzz properties on every CI run, without cargo-fuzz: every file of the seed corpus
//! (`fuzz/corpus/<target>/`) decoded exactly as the fuzz targets decode it, and thousands of
//! pseudo-random structured cases from fixed seeds, all through the shared checker
//! (`batchnorm::check`).
//!
//! The `fuzzing` feature (for `Case`'s `Arbitrary` implementation) is enabled for every
//! `cargo test` by the crate's dev-dependency on itself.

use std::path::{Path, PathBuf};

use batchnorm_check::arbitrary::{Arbitrary, Unstructured};
use batchnorm_check::{
    self as check, Arg, Case, Data, Delta, Dims, Eps, Fused, Grads, Kind, Op, Report, Rng, Saved,
    Storage, Update, Value, Weight,
};

/// Random bytes of a length below `max_len`, from the checker's generator.
fn random_bytes(rng: &mut Rng, max_len: usize) -> Vec<u8> {
    let len = rng.below(max_len);
    (0..len).map(|_| rng.next_u64() as u8).collect()
}

/// Decodes fuzz input bytes exactly as `fuzz_target!(|case: Case| ..)` does.
fn decode(bytes: &[u8]) -> Case {
    Case::arbitrary_take_rest(Unstructured::new(bytes)).expect("decoding never fails")
}

fn corpus_dir(op: Op) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(op.name())
}

fn corpus_files(op: Op) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus_dir(op))
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.retain(|p| p.is_file());
    files.sort();
    files
}

#[test]
fn decoding_is_the_same_with_and_without_arbitrary_and_round_trips() {
    let mut rng = Rng::new(1);
    for _ in 0..2000 {
        let bytes = random_bytes(&mut rng, 300);
        let case = decode(&bytes);
        assert_eq!(case, Case::from_bytes(&bytes), "bytes {bytes:02x?}");
        assert_eq!(
            Case::from_bytes(&case.to_bytes()),
            case,
            "bytes {bytes:02x?}"
        );
    }
}

/// Pseudo-random structured cases of `op` from a fixed seed (`FUZZ_REPLAY_CASES`, default 6000),
/// decoded from random bytes as the fuzz targets decode theirs, each run as decoded and again
/// with another storage type in turn. `keys` are the quantities the operation compares: each must
/// have been compared with the reference at least 100 times, so the test is not vacuous.
///
/// One test per operation, so the test harness runs them on every core (one test for all four
/// took 99 s of the suite's time, serially, on a 2-vCPU AMD EPYC family 25 model 1).
fn random_structured_cases(op: Op, keys: &[&str]) {
    let cases: usize = std::env::var("FUZZ_REPLAY_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6000);
    let mut report = Report::default();
    let mut failures = Vec::new();
    let start = std::time::Instant::now();
    let mut rng = Rng::new(0xfeed + op as u64);
    let others = [Storage::F16, Storage::Bf16, Storage::F64];
    for i in 0..cases {
        let case = decode(&random_bytes(&mut rng, 400));
        let other = others[i % others.len()];
        // The case as decoded, unless it is an f32 case paired with f64 below: a check of f64
        // data runs the f32 pass on the case's values unchanged before the f64 pass, so it covers
        // the f32 case too. (A half type's f32 pass runs on values rounded to that type first.)
        if !(case.storage == Storage::F32 && other == Storage::F64)
            && let Err(e) = check::check_with(op, &case, &mut report)
        {
            failures.push(e);
        }
        // The same case with another storage type, in turn (random bytes almost never carry the
        // storage marker).
        let case = Case {
            storage: other,
            ..case
        };
        if let Err(e) = check::check_with(op, &case, &mut report) {
            failures.push(e);
        }
    }
    println!("{}: {cases} cases in {:.1?}", op.name(), start.elapsed());
    println!("{report}");
    for f in failures.iter().take(20) {
        println!("{f}\n");
    }
    assert!(failures.is_empty(), "{} failing cases", failures.len());
    for key in keys {
        let n = report.checked(key);
        assert!(n >= 100, "{key}: only {n} comparisons");
    }
}

#[test]
fn random_structured_statistics_cases() {
    random_structured_cases(
        Op::Statistics,
        &[
            "statistics mean",
            "statistics m2",
            "statistics merged mean",
            "statistics merged m2",
            "half statistics",
            "f64 statistics mean",
            "f64 statistics m2",
            "f64 statistics merged mean",
            "f64 statistics merged m2",
        ],
    );
}

#[test]
fn random_structured_inference_cases() {
    random_structured_cases(
        Op::Inference,
        &[
            "inference y",
            "half inference y",
            "half inference fused y",
            "f64 inference y",
        ],
    );
}

#[test]
fn random_structured_training_cases() {
    random_structured_cases(
        Op::Training,
        &[
            "training y",
            "training saved mean",
            "training saved inv_std",
            "training running mean",
            "training running var",
            "training stats mean",
            "half training y",
            "half training fused y",
            "half training statistics",
            "f64 training y",
            "f64 training saved mean",
            "f64 training saved inv_std",
            "f64 training running mean",
            "f64 training running var",
            "f64 training stats mean",
        ],
    );
}

#[test]
fn random_structured_backward_cases() {
    random_structured_cases(
        Op::Backward,
        &[
            "training dx",
            "training dgamma",
            "training dbeta",
            "frozen dx",
            "frozen dgamma",
            "frozen dbeta",
            "half backward dx",
            "half backward dgamma, dbeta",
            "f64 training dx",
            "f64 training dgamma",
            "f64 training dbeta",
            "f64 frozen dx",
            "f64 frozen dgamma",
            "f64 frozen dbeta",
        ],
    );
}

/// Every file of `op`'s corpus on every backend this CPU has. One test per operation, so the
/// harness runs them beside each other and beside the other tests (one test for all four
/// corpora took 28 s on one core, the longest of the suite; AMD EPYC family 25 model 17).
fn corpus_replays_clean(op: Op) {
    let mut report = Report::default();
    let mut failures = Vec::new();
    let files = corpus_files(op);
    assert!(
        !files.is_empty(),
        "no corpus in {}",
        corpus_dir(op).display()
    );
    for path in &files {
        let bytes = std::fs::read(path).unwrap();
        let case = decode(&bytes);
        for b in 0..check::backends().len() {
            let case = Case {
                backend: b as u8,
                ..case.clone()
            };
            if let Err(e) = check::check_with(op, &case, &mut report) {
                failures.push(format!("{}: {e}", path.display()));
            }
        }
    }
    println!("{} {} corpus files\n{report}", files.len(), op.name());
    for f in failures.iter().take(20) {
        println!("{f}\n");
    }
    assert!(
        failures.is_empty(),
        "{} failing corpus files",
        failures.len()
    );
}

#[test]
fn statistics_corpus_replays_clean() {
    corpus_replays_clean(Op::Statistics);
}

#[test]
fn inference_corpus_replays_clean() {
    corpus_replays_clean(Op::Inference);
}

#[test]
fn training_corpus_replays_clean() {
    corpus_replays_clean(Op::Training);
}

#[test]
fn backward_corpus_replays_clean() {
    corpus_replays_clean(Op::Backward);
}

/// The quantity of a failure's first finding (`"- training dx element 3 …"` → `"training dx"`).
fn failure_key(failure: &str) -> String {
    let line = failure
        .lines()
        .find_map(|l| l.strip_prefix("- "))
        .unwrap_or("");
    let end = [
        " element ",
        " channel ",
        ": ",
        " differs",
        " did not",
        " wrote",
        " changed",
    ]
    .iter()
    .filter_map(|p| line.find(p))
    .min()
    .unwrap_or(line.len());
    line[..end].to_string()
}

/// Candidate simplifications of a case, simplest first.
fn simplifications(case: &Case) -> Vec<Case> {
    use check::{Data, Eps, Grads, Kind, Saved, Update, dim, dim_byte};
    let mut out = Vec::new();
    let mut push = |f: &dyn Fn(&mut Case)| {
        let mut c = case.clone();
        f(&mut c);
        if &c != case {
            out.push(c);
        }
    };
    // Each dimension to a smaller size.
    for d in [1usize, 2, 3, 4, 5, 8, 9, 16, 17, 32, 33, 64, 65] {
        let b = dim_byte(d).unwrap();
        let smaller = |x: u8| dim(b) < dim(x);
        if smaller(case.dims.n) {
            push(&|c| c.dims.n = b);
        }
        if smaller(case.dims.c) {
            push(&|c| c.dims.c = b);
        }
        for i in 0..case.dims.spatial.len() {
            if smaller(case.dims.spatial[i]) {
                push(&|c| c.dims.spatial[i] = b);
            }
        }
    }
    for i in 0..case.dims.spatial.len() {
        push(&|c| {
            c.dims.spatial.remove(i);
        });
    }
    let fields: [fn(&mut Case) -> &mut Data; 6] = [
        |c| &mut c.x,
        |c| &mut c.dy,
        |c| &mut c.gamma,
        |c| &mut c.beta,
        |c| &mut c.running_mean,
        |c| &mut c.running_var,
    ];
    for field in fields {
        let d = field(&mut case.clone()).clone();
        for i in 0..d.specials.len() {
            push(&|c| {
                field(c).specials.remove(i);
            });
        }
        for i in 0..d.kinds.len() {
            push(&|c| {
                field(c).kinds.remove(i);
            });
            push(&|c| field(c).kinds[i] = Kind::Normal);
        }
        push(&|c| field(c).seed = 0);
    }
    push(&|c| c.eps = Eps::Default);
    push(&|c| c.update = Update::None);
    if matches!(case.grads, Grads::Accumulate(..)) {
        push(&|c| c.grads = Grads::Overwrite);
    }
    push(&|c| c.saved = Saved::FromForward);
    push(&|c| c.mismatch = None);
    push(&|c| c.nhwc = false);
    push(&|c| c.sequential = true);
    push(&|c| c.no_affine = true);
    push(&|c| c.fused = Fused::None);
    push(&|c| c.backend = 0);
    push(&|c| c.storage = Storage::F32);
    push(&|c| c.split = 0);
    push(&|c| c.dims.extreme = 0);
    out
}

/// Greedy minimization of a failing case: keeps any simplification that fails with the same
/// first finding, until none does.
fn minimize(op: Op, mut case: Case) -> Case {
    let Err(failure) = check::check(op, &case) else {
        return case;
    };
    let key = failure_key(&failure);
    let fails = |c: &Case| check::check(op, c).is_err_and(|f| failure_key(&f) == key);
    while let Some(c) = simplifications(&case).into_iter().find(|c| fails(c)) {
        case = c;
    }
    case
}

/// Minimizes a failing input: `FUZZ_MINIMIZE=<target>:<file or hex bytes> cargo test --test
/// fuzz_replay minimize -- --ignored --nocapture` (hex as printed by the checker, e.g.
/// `02, cb, 01`). Prints the minimized case, its bytes and its generated arguments.
#[test]
#[ignore = "a tool: run with FUZZ_MINIMIZE set"]
fn minimize_input() {
    let spec = std::env::var("FUZZ_MINIMIZE").expect("FUZZ_MINIMIZE=<target>:<file or hex>");
    let (target, input) = spec.split_once(':').expect("<target>:<file or hex>");
    let op = Op::from_name(target).expect("a target name");
    let bytes = std::fs::read(input).unwrap_or_else(|_| {
        input
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|h| !h.is_empty())
            .map(|h| u8::from_str_radix(h, 16).expect("hex bytes"))
            .collect()
    });
    let case = minimize(op, decode(&bytes));
    println!("{case:?}\nbytes {:02x?}", case.to_bytes());
    println!("{}", check::describe(&case).unwrap_or_default());
    match check::check(op, &case) {
        Ok(()) => println!("passes"),
        Err(e) => println!("{}", e.lines().skip(2).collect::<Vec<_>>().join("\n")),
    }
}

/// The hand-written seed inputs: ordinary data, every data kind of the issue, tails and long runs,
/// non-finite values in one channel, wrong lengths, zero and overflowing shapes, invalid ε and
/// momentum, every running-update convention, every backward mode. Each target gets all of them
/// (a target uses the fields of its operation).
fn seed_cases() -> Vec<(String, Case)> {
    let base = Case {
        dims: Dims::new(2, 3, &[5]),
        ..Case::default()
    };
    let with = |f: &dyn Fn(&mut Case)| {
        let mut c = base.clone();
        f(&mut c);
        c
    };
    let mut seeds: Vec<(String, Case)> = vec![
        ("ordinary-nchw".into(), base.clone()),
        ("ordinary-nhwc".into(), with(&|c| c.nhwc = true)),
        (
            "sequential-no-affine".into(),
            with(&|c| {
                c.sequential = true;
                c.no_affine = true;
            }),
        ),
        (
            "tails-nhwc".into(),
            with(&|c| {
                c.dims = Dims::new(3, 17, &[33]);
                c.nhwc = true;
            }),
        ),
        (
            "tails-nchw".into(),
            with(&|c| c.dims = Dims::new(3, 17, &[33])),
        ),
        (
            "long-run".into(),
            with(&|c| c.dims = Dims::new(2, 1, &[4097])),
        ),
        (
            "wide-rows-nhwc".into(),
            with(&|c| {
                c.dims = Dims::new(5, 129, &[2, 3]);
                c.nhwc = true;
            }),
        ),
        (
            "one-value-per-channel".into(),
            with(&|c| {
                c.dims = Dims::new(1, 4, &[]);
                c.update = Update::Onnx;
            }),
        ),
        (
            "nan-inf-one-channel-each".into(),
            with(&|c| {
                c.dims = Dims::new(2, 5, &[7]);
                c.x = Data::default()
                    .with(3, Value::Nan)
                    .with(20, Value::Inf)
                    .with(50, Value::NegInf);
                c.dy = Data::default().with(60, Value::Nan);
                c.gamma = Data::default().with(4, Value::Inf);
                c.update = Update::Pytorch;
            }),
        ),
        (
            "nan-inf-nhwc".into(),
            with(&|c| {
                c.dims = Dims::new(3, 11, &[4]);
                c.nhwc = true;
                c.x = Data::default().with(0, Value::Nan).with(13, Value::NegInf);
                c.running_var = Data::default().with(5, Value::Nan);
            }),
        ),
        (
            "mixed-kinds".into(),
            with(&|c| {
                c.dims = Dims::new(2, 4, &[9]);
                c.x = Data {
                    kinds: vec![
                        Kind::Offset1e4,
                        Kind::Constant(Value::Offset3e6),
                        Kind::Tiny30,
                        Kind::Chaos,
                    ],
                    ..Data::default()
                };
                c.update = Update::Keras;
            }),
        ),
    ];
    for (name, kind) in [
        ("offset-1e4", Kind::Offset1e4),
        ("offset-3e6", Kind::Offset3e6),
        ("neg-offset-1e4", Kind::NegOffset1e4),
        ("offset-1e18", Kind::Offset1e18),
        ("constant", Kind::Constant(Value::Offset1e4)),
        ("huge-1e30", Kind::Huge30),
        ("huge-3e38", Kind::Huge38),
        ("spread-1e37", Kind::Spread37),
        ("near-max", Kind::NearMax),
        ("tiny-1e-30", Kind::Tiny30),
        ("subnormal", Kind::Subnormal),
        ("min-subnormal", Kind::MinSubnormal),
        ("signed-zeros", Kind::Zeros),
        ("chaos", Kind::Chaos),
        ("sparse", Kind::Sparse),
        ("integers", Kind::Integers),
        ("bits", Kind::Bits),
        ("wide-magnitudes", Kind::Wide),
        ("ulp-spread", Kind::UlpSpread),
    ] {
        seeds.push((
            format!("x-{name}"),
            with(&|c| {
                c.dims = Dims::new(3, 5, &[17]);
                c.x = Data::of(kind);
                c.update = Update::Pytorch;
            }),
        ));
        seeds.push((
            format!("dy-{name}"),
            with(&|c| {
                c.dims = Dims::new(3, 5, &[17]);
                c.dy = Data::of(kind);
            }),
        ));
    }
    for (name, eps) in [
        ("zero", Eps::Zero),
        ("neg-zero", Eps::NegZero),
        ("subnormal", Eps::Subnormal),
        ("huge", Eps::Huge),
        ("nan", Eps::Nan),
        ("negative", Eps::Negative),
        ("inf", Eps::Inf),
    ] {
        seeds.push((format!("eps-{name}"), with(&|c| c.eps = eps)));
    }
    for (name, fused) in [("relu", Fused::Relu), ("add-relu", Fused::AddRelu)] {
        seeds.push((
            format!("fused-{name}"),
            with(&|c| {
                c.dims = Dims::new(3, 5, &[17]);
                c.fused = fused;
                c.update = Update::Pytorch;
            }),
        ));
        seeds.push((
            format!("fused-{name}-nhwc-wide"),
            with(&|c| {
                c.dims = Dims::new(2, 257, &[3]);
                c.nhwc = true;
                c.fused = fused;
                c.dy = Data::of(Kind::Wide);
            }),
        ));
    }
    seeds.push((
        "fused-add-relu-short-z".into(),
        with(&|c| {
            c.fused = Fused::AddRelu;
            c.mismatch = Some((Arg::Dy, Delta::MinusOne));
        }),
    ));
    seeds.push((
        "eps-zero-constant".into(),
        with(&|c| {
            c.eps = Eps::Zero;
            c.x = Data::of(Kind::Constant(Value::Two));
        }),
    ));
    for (name, update) in [
        ("pytorch", Update::Pytorch),
        ("onnx", Update::Onnx),
        ("keras", Update::Keras),
        ("new-half-unbiased", Update::NewWeight(Weight::Half, true)),
        ("new-zero", Update::NewWeight(Weight::Zero, false)),
        ("old-one", Update::OldWeight(Weight::One, false)),
        ("old-tiny", Update::OldWeight(Weight::MinSubnormal, false)),
        ("new-nan", Update::NewWeight(Weight::Nan, false)),
        ("new-negative", Update::NewWeight(Weight::Negative, false)),
        ("old-above-one", Update::OldWeight(Weight::AboveOne, true)),
        ("cumulative-1", Update::Cumulative(1, true)),
        ("cumulative-7", Update::Cumulative(7, false)),
        ("cumulative-0", Update::Cumulative(0, false)),
    ] {
        seeds.push((format!("update-{name}"), with(&|c| c.update = update)));
    }
    seeds.push((
        "update-unbiased-one-value".into(),
        with(&|c| {
            c.dims = Dims::new(1, 3, &[]);
            c.update = Update::Pytorch;
        }),
    ));
    type Edit<'a> = (&'a str, &'a dyn Fn(&mut Case));
    let backward: [Edit; 6] = [
        ("frozen", &|c| c.frozen = true),
        ("frozen-no-grads", &|c| {
            c.frozen = true;
            c.grads = Grads::None;
        }),
        ("no-grads", &|c| c.grads = Grads::None),
        ("accumulate", &|c| {
            c.grads = Grads::Accumulate(Data::default(), Data::of(Kind::Integers))
        }),
        ("given-saved", &|c| {
            c.saved = Saved::Given(Data::default(), Data::of(Kind::Positive))
        }),
        ("given-saved-nan", &|c| {
            c.saved = Saved::Given(Data::default().with(1, Value::Nan), Data::default())
        }),
    ];
    for (name, f) in backward {
        seeds.push((format!("backward-{name}"), with(f)));
    }
    for (i, arg) in check::ARGS.into_iter().enumerate() {
        let delta = [Delta::Empty, Delta::MinusOne, Delta::PlusOne, Delta::Double][i % 4];
        seeds.push((
            format!("length-{arg:?}-{delta:?}").to_lowercase(),
            with(&|c| {
                c.mismatch = Some((arg, delta));
                c.update = Update::Pytorch;
                c.frozen = i % 2 == 1;
            }),
        ));
    }
    let dims = |n: u8, c: u8, spatial: Vec<u8>, extreme: u8| Dims {
        n,
        c,
        spatial,
        extreme,
    };
    for (name, d) in [
        ("zero-n", dims(0, 3, vec![5], 0)),
        ("zero-c", dims(2, 0, vec![5], 0)),
        ("zero-spatial", dims(2, 3, vec![3, 0], 0)),
        ("overflow-n", dims(2, 3, vec![5], 0xff)),
        ("overflow-spatial", dims(3, 3, vec![5], 0xff)),
        ("giant-valid", dims(2, 3, vec![5], 0xfe)),
    ] {
        seeds.push((format!("shape-{name}"), with(&|c| c.dims = d.clone())));
    }
    seeds.push(("unavailable-backend".into(), with(&|c| c.backend = 0x81)));
    for (name, storage) in [
        ("f16", Storage::F16),
        ("bf16", Storage::Bf16),
        ("f64", Storage::F64),
    ] {
        seeds.push((
            format!("storage-{name}"),
            with(&|c| {
                c.dims = Dims::new(3, 5, &[17]);
                c.storage = storage;
                c.update = Update::Pytorch;
            }),
        ));
        seeds.push((
            format!("storage-{name}-nhwc-fused-add-relu"),
            with(&|c| {
                c.dims = Dims::new(2, 33, &[3]);
                c.nhwc = true;
                c.storage = storage;
                c.fused = Fused::AddRelu;
                c.x = Data::of(Kind::Wide);
            }),
        ));
        seeds.push((
            format!("storage-{name}-overflow-nan-frozen"),
            with(&|c| {
                c.dims = Dims::new(2, 4, &[9]);
                c.storage = storage;
                c.frozen = true;
                c.x = Data {
                    kinds: vec![Kind::Offset1e4, Kind::Huge38, Kind::Subnormal, Kind::Normal],
                    ..Data::default()
                }
                .with(70, Value::Nan);
                c.dy = Data::of(Kind::Spread37);
            }),
        ));
    }
    seeds.push((
        "split-batch".into(),
        with(&|c| {
            c.dims = Dims::new(9, 3, &[4]);
            c.split = 4;
            c.x = Data::of(Kind::Offset3e6);
        }),
    ));
    seeds
}

fn seed_file(op: Op, name: &str) -> PathBuf {
    corpus_dir(op).join(format!("seed-{name}"))
}

/// Writes the seed inputs: `FUZZ_WRITE_SEEDS=1 cargo test --test fuzz_replay write_seed_corpus --
/// --ignored`.
#[test]
#[ignore = "a tool: run with FUZZ_WRITE_SEEDS=1 to (re)write fuzz/corpus/*/seed-*"]
fn write_seed_corpus() {
    assert_eq!(std::env::var("FUZZ_WRITE_SEEDS").as_deref(), Ok("1"));
    for op in Op::ALL {
        std::fs::create_dir_all(corpus_dir(op)).unwrap();
        for (name, case) in seed_cases() {
            std::fs::write(seed_file(op, &name), case.to_bytes()).unwrap();
        }
    }
}

#[test]
fn seed_corpus_is_present_and_decodes_to_the_seed_cases() {
    for op in Op::ALL {
        for (name, case) in seed_cases() {
            let path = seed_file(op, &name);
            let bytes = std::fs::read(&path)
                .unwrap_or_else(|e| panic!("{}: {e} (see write_seed_corpus)", path.display()));
            assert_eq!(decode(&bytes), case, "{}", path.display());
        }
    }
}
