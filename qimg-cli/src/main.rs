//! `qimg`: read, write, check and convert qcow2 and LUKS images.

fn main() {
    println!("qimg");
}
