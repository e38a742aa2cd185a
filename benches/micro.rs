//! Micro benchmarks: envelope encode/decode and token sign/verify. Run with `cargo bench --bench micro`.

use std::time::{Duration, SystemTime};

use criterion::{Criterion, criterion_group, criterion_main};
use wsgw::domain::{Envelope, Identity, TokenSigner};

const ENVELOPE: &str = r#"{"messageId":"01a24300-0000-7000-8000-000000000000","sendType":"SERVER_TO_CLIENT","messageType":"PAYMENT_SUCCEEDED","businessType":"payment","fromUniqueId":"cashier-7","toUniqueId":"order-8812","fromClientType":"backend","toClientType":"h5","timestamp":1796419441424,"content":{"orderId":"8812","amount":"12.50","text":"支付成功"},"tags":["vip"],"businesses":["payment"]}"#;

fn envelope(c: &mut Criterion) {
    c.bench_function("envelope_decode", |b| {
        b.iter(|| Envelope::from_json(std::hint::black_box(ENVELOPE)).expect("valid"))
    });
    let parsed = Envelope::from_json(ENVELOPE).expect("valid");
    c.bench_function("envelope_encode", |b| {
        b.iter(|| std::hint::black_box(&parsed).to_json())
    });
}

fn token(c: &mut Criterion) {
    let signer = TokenSigner::new(&[7u8; 32]).expect("secret");
    let identity = Identity::new("order-8812", "h5").expect("valid");
    let tags = vec!["vip".to_owned()];
    c.bench_function("token_sign", |b| {
        b.iter(|| {
            signer.mint(
                &identity,
                &tags,
                &[],
                Duration::from_secs(60),
                SystemTime::now(),
            )
        })
    });
    let token = signer.mint(
        &identity,
        &tags,
        &[],
        Duration::from_secs(60),
        SystemTime::now(),
    );
    c.bench_function("token_verify", |b| {
        b.iter(|| {
            signer
                .verify(std::hint::black_box(&token), SystemTime::now())
                .expect("valid")
        })
    });
}

criterion_group!(benches, envelope, token);
criterion_main!(benches);
