#![no_std]
#![no_main]
use ringvm_guests::start_info::StartInfo;
ringvm_guests::entry!(main);
fn main(_si: &StartInfo) -> ! {
    ringvm_guests::exit::exit(2)
}
