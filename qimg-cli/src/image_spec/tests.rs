//! Unit tests of the option parser: keys, `,,`, JSON nesting, errors.

use super::*;

fn opts(s: &str) -> Result<ImageSpec, String> {
    ImageSpec::from_arg(s, true, None).map_err(|e| e.msg)
}

fn json(s: &str) -> Result<ImageSpec, String> {
    ImageSpec::from_arg(s, false, None).map_err(|e| e.msg)
}

#[test]
fn option_lists_name_file_driver_secret_backing_and_data_file() {
    let s = opts(
        "driver=qcow2,file.driver=file,file.filename=/x/a.qcow2,encrypt.key-secret=s0,\
         encrypt.format=luks,backing.file.filename=b.qcow2,backing.encrypt.key-secret=s1,\
         data-file.filename=d.raw",
    )
    .unwrap();
    assert_eq!(s.path, "/x/a.qcow2");
    assert_eq!(s.format, Some(Format::Qcow2));
    assert_eq!(s.key_secret.as_deref(), Some("s0"));
    assert_eq!(s.encrypt_format.as_deref(), Some("luks"));
    assert_eq!(s.data_file.as_deref(), Some("d.raw"));
    let Backing::Spec(b) = &s.backing else {
        panic!("backing spec expected: {:?}", s.backing)
    };
    assert_eq!(b.path, "b.qcow2");
    assert_eq!(b.format, None, "a backing spec without driver is probed");
    assert_eq!(b.key_secret.as_deref(), Some("s1"));
    let l = opts("driver=luks,key-secret=k,file.filename=v").unwrap();
    assert_eq!(
        (l.format, l.key_secret.as_deref()),
        (Some(Format::Luks), Some("k"))
    );
    assert!(l.check_format(Format::Luks).is_ok());
    let e = s.check_format(Format::Raw).unwrap_err().msg;
    assert!(
        e.contains("Block format 'raw' does not support the option 'encrypt.key-secret'"),
        "{e}"
    );
    let f = opts("driver=file,filename=x.img").unwrap();
    assert_eq!((f.path.as_str(), f.format), ("x.img", Some(Format::Raw)));
    let p = opts("file.filename=probe.img").unwrap();
    assert_eq!((p.path.as_str(), p.format), ("probe.img", None));
    let n = opts("driver=qcow2,file.filename=o,backing=").unwrap();
    assert_eq!(n.backing, Backing::Without);
}

#[test]
fn doubled_commas_are_commas_and_later_keys_win() {
    let s = opts("driver=qcow2,file.filename=a,,b.qcow2,").unwrap();
    assert_eq!(s.path, "a,b.qcow2");
    let s = opts("driver=qcow2,file.filename=a,driver=raw").unwrap();
    assert_eq!(s.format, Some(Format::Raw));
    let s = opts("driver=qcow2,file.filename=x,file.filename=y").unwrap();
    assert_eq!(s.path, "y");
}

#[test]
fn json_nesting_and_dotted_keys_mean_the_same() {
    let a = json(r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"a.qcow2"},"encrypt":{"key-secret":"s0"},"backing":{"driver":"raw","file":{"filename":"b\"c.raw"}}}"#).unwrap();
    let b = json(r#"json:{"driver":"qcow2","file.filename":"a.qcow2","encrypt.key-secret":"s0","backing.driver":"raw","backing.file.filename":"b\u0022c.raw"}"#).unwrap();
    assert_eq!(a.path, "a.qcow2");
    assert_eq!(a.key_secret.as_deref(), Some("s0"));
    let Backing::Spec(bs) = &a.backing else {
        panic!()
    };
    assert_eq!(
        (bs.path.as_str(), bs.format),
        ("b\"c.raw", Some(Format::Raw))
    );
    assert_eq!(
        (a.path.clone(), a.key_secret.clone(), a.backing.clone()),
        (b.path, b.key_secret, b.backing)
    );
    let n = json(r#"json:{"driver":"qcow2","file":{"filename":"o"},"backing":null}"#).unwrap();
    assert_eq!(n.backing, Backing::Without);
    // A plain name is a path, and -f names the driver of a json: spec without one.
    assert_eq!(json("x,y.qcow2").unwrap().path, "x,y.qcow2");
    let f = ImageSpec::from_arg(
        r#"json:{"file":{"filename":"o"}}"#,
        false,
        Some(Format::Raw),
    )
    .unwrap();
    assert_eq!(f.format, Some(Format::Raw));
    let ws = json(" json:{}");
    assert_eq!(
        ws.unwrap().path,
        " json:{}",
        "only a leading json: is a spec"
    );
}

#[test]
fn discard_no_unref_is_a_qcow2_option() {
    for v in ["on", "true", "yes", "off", "false", "no"] {
        let arg = format!("driver=qcow2,discard-no-unref={v},file.filename=o");
        let spec = ImageSpec::from_arg(&arg, true, None).unwrap();
        assert_eq!(spec.path, "o");
        spec.check_format(Format::Qcow2).unwrap();
    }
    let raw = ImageSpec::from_arg("discard-no-unref=on,file.filename=o", true, None).unwrap();
    let e = raw.check_format(Format::Raw).unwrap_err();
    assert!(
        e.msg
            .contains("Block format 'raw' does not support the option 'discard-no-unref'"),
        "{}",
        e.msg
    );
}

#[test]
fn errors_have_qemu_img_wording() {
    let cases: &[(&str, bool, &str)] = &[
        ("driver=qcow2,file.filename=a,bogus=1", true, "Could not open 'driver=qcow2,file.filename=a,bogus=1': Block format 'qcow2' does not support the option 'bogus'"),
        ("driver=qcow2,file.filename=a,file.bogus=1", true, "Block protocol 'file' doesn't support the option 'bogus'"),
        ("driver=foo,file.filename=a", true, "Could not open 'driver=foo,file.filename=a': Unknown driver 'foo'"),
        ("driver=qcow2,file.driver=foo,file.filename=a", true, "Unknown driver 'foo'"),
        ("driver=qcow2", true, "A block device must be specified for \"file\""),
        ("driver=qcow2,filename=a", true, "A block device must be specified for \"file\""),
        ("", true, "Could not open '': Must specify either driver or file"),
        ("a.qcow2", true, "Could not open 'a.qcow2': Cannot find device='a.qcow2' nor node-name='a.qcow2'"),
        ("file.filename=a.qcow2,xyz", true, "Block format 'qcow2' does not support the option 'xyz'"),
        ("driver=qcow2,file=a.qcow2", true, "Cannot find device='a.qcow2' nor node-name='a.qcow2'"),
        ("driver=qcow2,file.filename=a,novalue", true, "does not support the option 'value'"),
        ("driver=qcow2,file.filename=a,=x", true, "does not support the option ''"),
        ("driver=vmdk,file.filename=a", true, "qimg does not implement the driver 'vmdk'"),
        ("driver=qcow2,file.filename=a,l2-cache-size=1M", true, "qimg does not implement the option 'l2-cache-size'"),
        ("driver=qcow2,file.filename=a,discard-no-unref=1", true, "Parameter 'discard-no-unref' expects 'on' or 'off'"),
        ("driver=qcow2,file.filename=a,file.discard-no-unref=on", true, "Block protocol 'file' doesn't support the option 'discard-no-unref'"),
        ("driver=qcow2,file.filename=o,backing.driver=qcow2,backing.file.filename=b,backing.bogus=1", true, "Could not open backing file: Block format 'qcow2' does not support the option 'bogus'"),
        (r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"a.qcow2"}"#, false, "Could not parse the JSON options: JSON parse error, premature EOI"),
        (r#"json:{"driver":"qcow2","file":{"filename":"o"}}x"#, false, "Could not parse the JSON options: Expecting at most one JSON value"),
        (r#"json:{"driver":"qcow2","file":{"filename":"o"},"driver":"raw"}"#, false, "JSON parse error, duplicate key"),
        (r#"json:{"driver":"qcow2" "file":{"filename":"o"}}"#, false, "JSON parse error, expected separator in dict"),
        (r#"json:{"driver":qcow2}"#, false, "JSON parse error, invalid keyword 'qcow'"),
        (r#"json:{"driver":"qcow2","file":{"filename":"o"},}"#, false, "JSON parse error, expecting value"),
        ("json:", false, "Could not open 'json:': Could not parse the JSON options: Expecting a JSON value"),
        ("json:[1]", false, "Could not open 'json:[1]': Invalid JSON object given"),
        (r#"json:{"driver":"qcow2","file":{"filename":"o", "x":1}}"#, false, "Block protocol 'file' doesn't support the option 'x'"),
        (r#"json:{"driver":"qcow2","file":{"filename":"o"},"backing":"b"}"#, false, "Could not open backing file: Cannot find device='b' nor node-name='b'"),
    ];
    for (arg, image_opts, want) in cases {
        let got = ImageSpec::from_arg(arg, *image_opts, None)
            .map(|_| ())
            .unwrap_err();
        assert!(got.msg.contains(want), "{arg}: {} (wanted {want})", got.msg);
        assert_eq!(got.code, 1, "{arg}");
    }
    let e =
        ImageSpec::from_arg("driver=qcow2,file.filename=a", true, Some(Format::Qcow2)).unwrap_err();
    assert_eq!(e.msg, "--image-opts and --format are mutually exclusive");
}

#[test]
fn json_depth_and_odd_bytes_never_panic() {
    let deep = format!("json:{}{}", "{\"a\":".repeat(200), "}".repeat(200));
    assert!(json(&deep).unwrap_err().contains("too deeply nested"));
    for s in [
        "json:{\"a\":\"\\u12\"}",
        "json:{\"a\":\"\\ud800\\u0041\"}",
        "json:{\"\\",
        "json:{\"a\":-}",
        "json:{\"a\":[1,}",
    ] {
        assert!(json(s).is_err(), "{s}");
    }
}

#[test]
fn encryption_format_is_checked_against_the_header() {
    use qcow_core::CryptMethod;
    let s = opts("driver=qcow2,file.filename=e,encrypt.format=aes").unwrap();
    assert!(s
        .check_encryption(CryptMethod::Luks)
        .unwrap_err()
        .msg
        .ends_with("Header reported 'luks' encryption format but options specify 'aes'"));
    assert!(s.check_encryption(CryptMethod::Aes).is_ok());
    assert!(s
        .check_encryption(CryptMethod::None)
        .unwrap_err()
        .msg
        .contains("No encryption in image header, but options specified format 'aes'"));
    assert!(ImageSpec::path("x", None)
        .check_encryption(CryptMethod::Luks)
        .is_ok());
    let u = opts("driver=qcow2,file.filename=e,encrypt.bogus=1").unwrap();
    assert!(
        u.check_encryption(CryptMethod::None).is_ok(),
        "read only when encrypted"
    );
    let e = u.check_encryption(CryptMethod::Luks).unwrap_err().msg;
    assert!(e.ends_with("Parameter 'bogus' is unexpected"), "{e}");
    assert!(u.check_format(Format::Luks).is_err());
}
