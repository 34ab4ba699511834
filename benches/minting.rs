//! Minting benchmarks: signing a GitHub App JWT (RS256, what every installation-token mint
//! costs keyward itself), from a parsed key and from the PEM as stored.
//!
//! Run with `cargo bench --bench minting`.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use keyward::credentials::github_app::app_jwt;
use keyward::credentials::kind::rsa_key;

const PEM: &str = include_str!("../tests/keys/test-rsa-2048.pem");

fn jwt(c: &mut Criterion) {
    let key = rsa_key(PEM).expect("the test key parses");
    let mut group = c.benchmark_group("mint");
    group.bench_function("github_app_jwt_rs256", |b| {
        b.iter(|| black_box(app_jwt(black_box(&key), "12345", 1_900_000_000).expect("signs")))
    });
    group.bench_function("parse_pem_and_sign", |b| {
        b.iter(|| {
            let key = rsa_key(black_box(PEM)).expect("the test key parses");
            black_box(app_jwt(&key, "12345", 1_900_000_000).expect("signs"))
        })
    });
    group.finish();
}

criterion_group!(benches, jwt);
criterion_main!(benches);
