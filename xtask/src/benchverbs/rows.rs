//! The rows of `cargo xtask bench-compare`: each verb's qimg and qemu-img
//! command lines, its setup and how its two outputs are cross-checked.

use super::*;

pub(super) fn rows() -> Vec<Row> {
    let rm: fn(&Ctx, Tool, &Path) -> Result<(), String> = |_, _, out| remove(out);
    let plain_check: CheckFn = Box::new(|c, o, _| check_plain(c, o));
    let mut v = vec![
        Row {
            name: "convert qcow2->raw",
            inputs: &[Input::Plain],
            floor: Floor::Sparse,
            ext: "raw",
            args: Box::new(|c, _, o| {
                let mut a = os(&["convert", "-f", "qcow2", "-O", "raw"]);
                a.extend([p(&c.plain), p(o)]);
                a
            }),
            prep: Box::new(rm),
            check: Box::new(|c, o, _| check_plain(c, o)),
        },
        Row {
            name: "convert LUKS qcow2->raw",
            inputs: &[Input::Enc],
            floor: Floor::Sparse,
            ext: "raw",
            args: Box::new(|c, t, o| {
                let mut a = os(&["convert", "-O", "raw", "--object", &c.secret]);
                if t == Tool::Qemu {
                    a.extend([
                        "--image-opts".into(),
                        opts("qcow2", "encrypt.key-secret", &c.enc),
                    ]);
                } else {
                    a.push(p(&c.enc));
                }
                a.push(p(o));
                a
            }),
            prep: Box::new(rm),
            check: Box::new(|c, o, _| check_plain(c, o)),
        },
        Row {
            name: "convert compressed qcow2->raw",
            inputs: &[Input::Comp],
            floor: Floor::Sparse,
            ext: "raw",
            args: Box::new(|c, _, o| {
                let mut a = os(&["convert", "-f", "qcow2", "-O", "raw"]);
                a.extend([p(&c.comp), p(o)]);
                a
            }),
            prep: Box::new(rm),
            check: plain_check,
        },
        Row {
            name: "convert raw->qcow2",
            inputs: &[],
            floor: Floor::Sparse,
            ext: "qcow2",
            args: Box::new(|c, _, o| Input::Plain.convert_args(c, o)),
            prep: Box::new(rm),
            check: Box::new(|c, o, _| check_qcow2(c, o)),
        },
        Row {
            name: "convert raw->LUKS qcow2",
            inputs: &[],
            floor: Floor::Sparse,
            ext: "qcow2",
            args: Box::new(|c, _, o| Input::Enc.convert_args(c, o)),
            prep: Box::new(rm),
            check: Box::new(|c, o, _| check_encrypted(c, o, "qcow2", "encrypt.key-secret")),
        },
        Row {
            name: "convert raw->raw LUKS",
            inputs: &[],
            // Ciphertext of zeros is not zero: the volume holds every byte.
            floor: Floor::Dense,
            ext: "luks",
            args: Box::new(|c, _, o| Input::Luks.convert_args(c, o)),
            prep: Box::new(rm),
            check: Box::new(|c, o, _| check_encrypted(c, o, "luks", "key-secret")),
        },
        Row {
            name: "convert raw LUKS->raw",
            inputs: &[Input::Luks],
            floor: Floor::Sparse,
            ext: "raw",
            args: Box::new(|c, t, o| {
                let mut a = os(&["convert", "-O", "raw", "--object", &c.secret]);
                if t == Tool::Qemu {
                    a.extend(["--image-opts".into(), opts("luks", "key-secret", &c.luks)]);
                } else {
                    a.push(p(&c.luks));
                }
                a.push(p(o));
                a
            }),
            prep: Box::new(rm),
            check: Box::new(|c, o, _| check_plain(c, o)),
        },
        Row {
            name: "convert raw->qcow2 -c",
            inputs: &[],
            floor: Floor::None,
            ext: "qcow2",
            args: Box::new(|c, _, o| Input::Comp.convert_args(c, o)),
            prep: Box::new(rm),
            check: Box::new(|c, o, _| check_qcow2(c, o)),
        },
        Row {
            name: "compare qcow2 vs raw",
            inputs: &[Input::Plain],
            floor: Floor::None,
            ext: "",
            args: Box::new(|c, _, _| {
                let mut a = os(&["compare", "-f", "qcow2", "-F", "raw"]);
                a.extend([p(&c.plain), p(&c.src)]);
                a
            }),
            prep: Box::new(|_, _, _| Ok(())),
            check: Box::new(|_, _, t| check_same_text("compare output (both exit 0)", t)),
        },
        Row {
            name: "commit",
            inputs: &[],
            floor: Floor::None,
            ext: "qcow2",
            args: Box::new(|_, _, o| {
                let mut a = os(&["commit", "-q"]);
                a.push(p(o));
                a
            }),
            prep: Box::new(|c, _, o| {
                let base = o.with_extension("base");
                remove(&base)?;
                File::create(&base)
                    .and_then(|f| f.set_len(c.bytes))
                    .map_err(|e| format!("{}: {e}", base.display()))?;
                overlay(o, &base, c.mib / 2)
            }),
            check: Box::new(|_, o, _| {
                let (qb, mb) = (o[0].with_extension("base"), o[1].with_extension("base"));
                crate::bench::commit_results_agree(&qb, &mb, o[0], o[1])?;
                Ok("bases byte-identical, overlays equal, qimg's overlay clean".into())
            }),
        },
        Row {
            name: "rebase (safe) onto zeros",
            inputs: &[],
            floor: Floor::None,
            ext: "qcow2",
            args: Box::new(|c, _, o| {
                let mut a = os(&["rebase", "-q", "-f", "qcow2", "-F", "raw", "-b"]);
                a.extend([p(&c.zero), p(o)]);
                a
            }),
            prep: Box::new(|c, _, o| overlay(o, &c.src, c.mib / 4)),
            check: Box::new(|c, o, _| {
                qemu_compare(o[0], o[1])?;
                stdout_of(Command::new("qemu-img").args(["check", "-q"]).arg(o[1]))?;
                // Both now read as the source with the overlay's writes.
                let want = c.work.join("rebase-want.qcow2");
                overlay(&want, &c.src, c.mib / 4)?;
                qemu_compare(o[1], &want)?;
                remove(&want)?;
                Ok("results equal each other and the overlay before; qimg's clean".into())
            }),
        },
        Row {
            name: "check compressed qcow2",
            inputs: &[Input::Comp],
            floor: Floor::None,
            ext: "",
            args: Box::new(|c, _, _| {
                let mut a = os(&["check", "-f", "qcow2"]);
                a.push(p(&c.comp));
                a
            }),
            prep: Box::new(|_, _, _| Ok(())),
            check: Box::new(|_, _, t| check_same_text("check output", t)),
        },
        Row {
            name: "map --output=json qcow2",
            inputs: &[Input::Plain],
            floor: Floor::None,
            ext: "",
            args: Box::new(|c, _, _| {
                let mut a = os(&["map", "--output=json", "-f", "qcow2"]);
                a.push(p(&c.plain));
                a
            }),
            prep: Box::new(|_, _, _| Ok(())),
            check: Box::new(|_, _, t| check_same_text("map JSON", t)),
        },
        Row {
            name: "dd qcow2->raw bs=1M",
            inputs: &[Input::Plain],
            floor: Floor::None,
            ext: "raw",
            args: Box::new(|c, _, o| {
                let mut a = os(&["dd", "-f", "qcow2", "-O", "raw", "bs=1M"]);
                let mut i = OsString::from("if=");
                i.push(&c.plain);
                let mut of = OsString::from("of=");
                of.push(o);
                a.extend([i, of]);
                a
            }),
            prep: Box::new(rm),
            check: Box::new(|c, o, _| {
                if !same_bytes(o[0], o[1])? {
                    return Err(format!(
                        "dd: {} and {} differ",
                        o[0].display(),
                        o[1].display()
                    ));
                }
                if !same_bytes(o[1], &c.src)? {
                    return Err(format!("dd: {} differs from the source", o[1].display()));
                }
                Ok("outputs byte-identical, equal to the source".into())
            }),
        },
        Row {
            name: "measure -O qcow2 raw",
            inputs: &[],
            floor: Floor::None,
            ext: "",
            args: Box::new(|c, _, _| {
                let mut a = os(&["measure", "-O", "qcow2", "-f", "raw"]);
                a.push(p(&c.src));
                a
            }),
            prep: Box::new(|_, _, _| Ok(())),
            check: Box::new(|_, _, t| check_same_text("measure output", t)),
        },
    ];
    v.shrink_to_fit();
    v
}
