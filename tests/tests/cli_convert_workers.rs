//! `qimg convert -m N` (worker threads) and `-p` (progress bar): the output
//! never depends on the worker count, and the bar appears only on a
//! terminal.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

use qimg_tests::qemu::{pattern, write_tmp, Qemu};
use qimg_tests::{poke, qimg, run_ok, sha256_file, tool};

const SECRET: &str = "secret,id=s0,data=workers";

#[test]
fn worker_count_never_changes_the_output() {
    let Some(q) = Qemu::find() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    // Big enough that every request is split (4 MiB, with zero runs).
    let src = write_tmp(t, "src.raw", &pattern(6 << 20, 42, 7));
    let want = sha256_file(&src);
    // Encrypted qcow2 and raw LUKS, each written by qimg with -m 3.
    let qc = t.join("enc.qcow2");
    let lk = t.join("vol.luks");
    for (dst, fmt, opts) in [
        (
            &qc,
            "qcow2",
            "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
        ),
        (&lk, "luks", "key-secret=s0,iter-time=10"),
    ] {
        run_ok(
            qimg()
                .args([
                    "convert", "-q", "-m", "3", "--object", SECRET, "-O", fmt, "-o", opts,
                ])
                .arg(&src)
                .arg(dst),
        );
        // qemu-img decrypts what the three workers encrypted.
        let back = t.join(format!("{fmt}-qemu.raw"));
        q.decrypt_to_raw(SECRET, fmt, dst, "", &back);
        let mut back_len = std::fs::read(&back).unwrap();
        back_len.truncate(6 << 20);
        assert_eq!(
            qimg_tests::sha256_hex(&back_len),
            want,
            "{fmt} written with -m 3"
        );
        // Every worker count reads it back to the same bytes.
        for m in ["1", "2", "4"] {
            let out = t.join(format!("{fmt}-m{m}.raw"));
            run_ok(
                qimg()
                    .args(["convert", "-m", m, "--object", SECRET, "-O", "raw"])
                    .arg(dst)
                    .arg(&out),
            );
            assert_eq!(sha256_file(&out), want, "{fmt} read with -m {m}");
        }
    }
    // Plain qcow2 output is byte-identical for any -m.
    let a = t.join("m1.qcow2");
    let b = t.join("m4.qcow2");
    run_ok(
        qimg()
            .args(["convert", "-m", "1", "-O", "qcow2"])
            .arg(&src)
            .arg(&a),
    );
    run_ok(
        qimg()
            .args(["convert", "-m", "4", "-W", "-O", "qcow2"])
            .arg(&src)
            .arg(&b),
    );
    assert_eq!(sha256_file(&a), sha256_file(&b));
}

#[test]
fn progress_bar_only_on_a_terminal() {
    let Some(script) = tool("script") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let src = write_tmp(t, "src.raw", &pattern(8 << 20, 1, 0));
    // Under a pseudo-terminal (util-linux `script`), the bar is drawn and
    // ends at 100%.
    let cmd = format!(
        "{} convert -p -O qcow2 {} {}",
        qimg_tests::qimg_bin().display(),
        src.display(),
        t.join("tty.qcow2").display()
    );
    let out = Command::new(script)
        .args(["-qec", &cmd, "/dev/null"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("100%"),
        "no progress bar on a terminal: {shown:?}"
    );
    // With standard error a pipe, nothing is drawn.
    let out = qimg()
        .args(["convert", "-p", "-O", "qcow2"])
        .arg(&src)
        .arg(t.join("pipe.qcow2"))
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(
        out.stderr.is_empty(),
        "bar drawn into a pipe: {:?}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Partly compressible bytes: random 4 KiB blocks (stored uncompressed when
/// a whole cluster is random), repeated text, and zero blocks.
fn mixed(len: usize) -> Vec<u8> {
    let noise = pattern(len, 9, 0);
    let mut out = vec![0u8; len];
    for (i, block) in out.chunks_mut(4096).enumerate() {
        match i % 7 {
            0 | 1 => block.copy_from_slice(&noise[i * 4096..i * 4096 + block.len()]),
            2 => {}
            _ => {
                let text = format!("block {i} of a compressible run; ");
                for (j, b) in block.iter_mut().enumerate() {
                    *b = text.as_bytes()[j % text.len()];
                }
            }
        }
    }
    // A run of wholly random clusters, which stay uncompressed.
    out[1 << 20..(3 << 20) / 2].copy_from_slice(&noise[1 << 20..(3 << 20) / 2]);
    out
}

#[test]
fn compressed_output_is_identical_for_any_worker_count() {
    let Some(q) = Qemu::find() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    // Not a whole number of clusters, so the zero-padded tail is covered.
    let src = write_tmp(t, "src.raw", &mixed((5 << 20) + 12288));
    let want = sha256_file(&src);
    for ctype in ["zlib", "zstd"] {
        let mut sums = Vec::new();
        for m in ["1", "2", "4"] {
            let out = t.join(format!("{ctype}-m{m}.qcow2"));
            run_ok(
                qimg()
                    .args(["convert", "-c", "-m", m, "-O", "qcow2", "-o"])
                    .arg(format!("compression_type={ctype},cluster_size=65536"))
                    .arg(&src)
                    .arg(&out),
            );
            sums.push(sha256_file(&out));
            if m == "2" {
                // qemu-img reads what two workers compressed, and finds it clean.
                let back = t.join(format!("{ctype}-back.raw"));
                q.to_raw(&out, &back, &[]);
                assert_eq!(sha256_file(&back), want, "{ctype} read by qemu-img");
                q.assert_clean(&out, &format!("{ctype} -m 2"));
            }
        }
        assert!(
            sums.windows(2).all(|w| w[0] == w[1]),
            "{ctype}: -m 1, 2, 4 give different files"
        );
    }
}

/// Compressible bytes: numbered text lines, a zero run every few clusters.
fn text(len: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 64);
    let mut i = seed;
    while out.len() < len {
        out.extend_from_slice(format!("line {i} of {seed}: {}\n", i * 7919 % 104_729).as_bytes());
        i += 1;
    }
    out.truncate(len);
    for (n, block) in out.chunks_mut(24 << 10).enumerate() {
        if n % 5 == 3 {
            block.fill(0);
        }
    }
    out
}

/// Compressed sources (made by qemu-img, some clusters rewritten
/// uncompressed afterwards, a partial last cluster) decode on several
/// threads to the same bytes as on one, and a damaged compressed cluster
/// gives the same error whatever the worker count.
#[test]
fn compressed_sources_decode_the_same_on_any_worker_count() {
    let Some(q) = Qemu::find() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    for (cs, len) in [(4096usize, (3 << 20) + 1536), (65536, (5 << 20) + 4096)] {
        let data = text(len, cs as u64);
        let src = write_tmp(t, &format!("text-{cs}.raw"), &data);
        let img = t.join(format!("comp-{cs}.qcow2"));
        q.convert(
            &["-c", "-O", "qcow2", "-o", &format!("cluster_size={cs}")],
            &src,
            &img,
        );
        // A few clusters rewritten plainly, between compressed ones.
        let plain = write_tmp(t, "plain.raw", &pattern(2 * cs, 9, 0));
        q.write_file(&img, "qcow2", 3 * cs as u64, &plain);
        let mut want = data.clone();
        want[3 * cs..5 * cs].copy_from_slice(&std::fs::read(&plain).unwrap());
        let want = qimg_tests::sha256_hex(&want);
        // Host offsets of the compressed clusters the first L2 table maps.
        let bytes = std::fs::read(&img).unwrap();
        let l2 = poke::l2_table(&bytes, 0);
        let cb = cs.trailing_zeros();
        let host_mask = (1u64 << (62 - (cb - 8))) - 1;
        let compressed: Vec<u64> = (0..(cs / 8) as u64)
            .map(|i| poke::get64(&bytes, l2 + 8 * i))
            .filter(|e| e & (1 << 62) != 0)
            .map(|e| e & host_mask)
            .collect();
        assert!(
            compressed.len() > 8,
            "cs {cs}: {} compressed",
            compressed.len()
        );
        for m in ["1", "2", "4"] {
            let out = t.join(format!("out-{cs}-{m}.raw"));
            run_ok(
                qimg()
                    .args(["convert", "-m", m, "-O", "raw"])
                    .arg(&img)
                    .arg(&out),
            );
            assert_eq!(sha256_file(&out), want, "cluster {cs}, -m {m}");
        }
        // Damage one compressed stream in the middle of the image.
        let bad = t.join(format!("bad-{cs}.qcow2"));
        std::fs::copy(&img, &bad).unwrap();
        let at = compressed[compressed.len() / 2];
        let mut bytes = bytes;
        let at = usize::try_from(at).unwrap();
        bytes[at..at + 64].fill(0xff);
        std::fs::write(&bad, &bytes).unwrap();
        let mut errors = Vec::new();
        for m in ["1", "2"] {
            let out = t.join(format!("bad-{cs}-{m}.raw"));
            let err = qimg_tests::run_fails(
                qimg()
                    .args(["convert", "-m", m, "-O", "raw"])
                    .arg(&bad)
                    .arg(&out),
            );
            assert!(err.contains("compressed"), "-m {m}: {err}");
            errors.push(err);
        }
        assert_eq!(errors[0], errors[1], "cluster {cs}");
    }
}
