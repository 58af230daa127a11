//! The binary masked-input parser: decode and the borrowed view must agree and never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tessera_secagg::wire::{MaskedInput, MaskedInputView};

fuzz_target!(|data: &[u8]| {
    let owned = MaskedInput::decode(data);
    let view = MaskedInputView::parse(data);
    assert_eq!(owned.is_ok(), view.is_ok());
    if let (Ok(m), Ok(v)) = (owned, view) {
        assert_eq!(MaskedInput::data_digest(&m.data, m.bits), v.data_digest());
        assert_eq!(m.encode(), data);
    }
});
