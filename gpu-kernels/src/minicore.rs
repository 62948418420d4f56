//! The few lang items a `#![no_core]` crate needs for the kernels to read like ordinary
//! Rust (compiled only for `nvptx64`; the host build uses the real `core`). Modelled on
//! rustc's `tests/auxiliary/minicore.rs`. Operator impls on primitives are never called:
//! the compiler lowers primitive arithmetic itself, the impls only satisfy type checking.
#![allow(dead_code, clippy::all)]

#[lang = "pointee_sized"]
pub trait PointeeSized {}
#[lang = "meta_sized"]
pub trait MetaSized: PointeeSized {}
#[lang = "sized"]
pub trait Sized: MetaSized {}
#[lang = "freeze"]
pub unsafe auto trait Freeze {}
#[lang = "unsafe_unpin"]
pub unsafe auto trait UnsafeUnpin {}
#[lang = "unpin"]
pub auto trait Unpin {}
#[lang = "sync"]
pub unsafe trait Sync {}
#[lang = "clone"]
pub trait Clone: Sized {
    fn clone(&self) -> Self;
}
#[lang = "copy"]
pub trait Copy: Clone {}
#[lang = "legacy_receiver"]
pub trait LegacyReceiver {}
impl<T: ?Sized> LegacyReceiver for &T {}
impl<T: ?Sized> LegacyReceiver for &mut T {}

macro_rules! copy_impls {
    ($($t:ty)*) => { $(
        impl Clone for $t { #[inline(always)] fn clone(&self) -> Self { *self } }
        impl Copy for $t {}
        unsafe impl Sync for $t {}
    )* }
}
copy_impls!(bool u8 u16 u32 u64 usize i8 i16 i32 i64 isize f32 f64);
impl<T: ?Sized> Clone for *const T {
    #[inline(always)]
    fn clone(&self) -> Self {
        *self
    }
}
impl<T: ?Sized> Copy for *const T {}
impl<T: ?Sized> Clone for *mut T {
    #[inline(always)]
    fn clone(&self) -> Self {
        *self
    }
}
impl<T: ?Sized> Copy for *mut T {}
impl<T: Copy, const N: usize> Clone for [T; N] {
    #[inline(always)]
    fn clone(&self) -> Self {
        *self
    }
}
impl<T: Copy, const N: usize> Copy for [T; N] {}

macro_rules! binop {
    ($lang:literal $Tr:ident $m:ident $op:tt; $($t:ty)*) => {
        #[lang = $lang]
        pub trait $Tr<R = Self> { type Output; fn $m(self, r: R) -> Self::Output; }
        $( impl $Tr for $t { type Output = $t; #[inline(always)] fn $m(self, r: $t) -> $t { self $op r } } )*
    };
}
macro_rules! assignop {
    ($lang:literal $Tr:ident $m:ident $op:tt; $($t:ty)*) => {
        #[lang = $lang]
        pub trait $Tr<R = Self> { fn $m(&mut self, r: R); }
        $( impl $Tr for $t { #[inline(always)] fn $m(&mut self, r: $t) { *self $op r } } )*
    };
}
binop!("add" Add add +; u8 u16 u32 u64 usize i8 i16 i32 i64 isize f32 f64);
binop!("sub" Sub sub -; u8 u16 u32 u64 usize i8 i16 i32 i64 isize f32 f64);
binop!("mul" Mul mul *; u8 u16 u32 u64 usize i8 i16 i32 i64 isize f32 f64);
binop!("div" Div div /; u8 u16 u32 u64 usize i8 i16 i32 i64 isize f32 f64);
binop!("rem" Rem rem %; u8 u16 u32 u64 usize i8 i16 i32 i64 isize);
binop!("bitand" BitAnd bitand &; bool u8 u16 u32 u64 usize i32 i64);
binop!("bitor" BitOr bitor |; bool u8 u16 u32 u64 usize i32 i64);
binop!("bitxor" BitXor bitxor ^; bool u8 u16 u32 u64 usize i32 i64);
assignop!("add_assign" AddAssign add_assign +=; u8 u16 u32 u64 usize i32 i64 f32 f64);
assignop!("sub_assign" SubAssign sub_assign -=; u8 u16 u32 u64 usize i32 i64 f32 f64);
assignop!("mul_assign" MulAssign mul_assign *=; u32 u64 usize i32 i64 f32 f64);
assignop!("div_assign" DivAssign div_assign /=; u32 u64 usize f32 f64);
assignop!("rem_assign" RemAssign rem_assign %=; u32 u64 usize);
assignop!("bitand_assign" BitAndAssign bitand_assign &=; bool u32 u64 usize);
assignop!("bitor_assign" BitOrAssign bitor_assign |=; bool u32 u64 usize);
assignop!("bitxor_assign" BitXorAssign bitxor_assign ^=; bool u32 u64 usize);

macro_rules! shifts {
    ($($t:ty)*) => { $(
        impl Shl<u32> for $t { type Output = $t; #[inline(always)] fn shl(self, r: u32) -> $t { self << r } }
        impl Shr<u32> for $t { type Output = $t; #[inline(always)] fn shr(self, r: u32) -> $t { self >> r } }
        impl ShlAssign<u32> for $t { #[inline(always)] fn shl_assign(&mut self, r: u32) { *self <<= r } }
        impl ShrAssign<u32> for $t { #[inline(always)] fn shr_assign(&mut self, r: u32) { *self >>= r } }
    )* }
}
#[lang = "shl"]
pub trait Shl<R = Self> {
    type Output;
    fn shl(self, r: R) -> Self::Output;
}
#[lang = "shr"]
pub trait Shr<R = Self> {
    type Output;
    fn shr(self, r: R) -> Self::Output;
}
#[lang = "shl_assign"]
pub trait ShlAssign<R = Self> {
    fn shl_assign(&mut self, r: R);
}
#[lang = "shr_assign"]
pub trait ShrAssign<R = Self> {
    fn shr_assign(&mut self, r: R);
}
shifts!(u8 u16 u32 u64 usize i32 i64);

#[lang = "neg"]
pub trait Neg {
    type Output;
    fn neg(self) -> Self::Output;
}
impl Neg for f32 {
    type Output = f32;
    #[inline(always)]
    fn neg(self) -> f32 {
        -self
    }
}
impl Neg for f64 {
    type Output = f64;
    #[inline(always)]
    fn neg(self) -> f64 {
        -self
    }
}
impl Neg for i32 {
    type Output = i32;
    #[inline(always)]
    fn neg(self) -> i32 {
        -self
    }
}
impl Neg for i64 {
    type Output = i64;
    #[inline(always)]
    fn neg(self) -> i64 {
        -self
    }
}
#[lang = "not"]
pub trait Not {
    type Output;
    fn not(self) -> Self::Output;
}
impl Not for bool {
    type Output = bool;
    #[inline(always)]
    fn not(self) -> bool {
        !self
    }
}
impl Not for u32 {
    type Output = u32;
    #[inline(always)]
    fn not(self) -> u32 {
        !self
    }
}
impl Not for u64 {
    type Output = u64;
    #[inline(always)]
    fn not(self) -> u64 {
        !self
    }
}
impl Not for usize {
    type Output = usize;
    #[inline(always)]
    fn not(self) -> usize {
        !self
    }
}

#[lang = "eq"]
pub trait PartialEq<R: ?Sized = Self> {
    fn eq(&self, o: &R) -> bool;
    fn ne(&self, o: &R) -> bool {
        !self.eq(o)
    }
}
#[lang = "partial_ord"]
pub trait PartialOrd<R: ?Sized = Self>: PartialEq<R> {
    fn lt(&self, o: &R) -> bool;
    fn le(&self, o: &R) -> bool;
    fn gt(&self, o: &R) -> bool;
    fn ge(&self, o: &R) -> bool;
}
macro_rules! cmp_impls {
    ($($t:ty)*) => { $(
        impl PartialEq for $t { #[inline(always)] fn eq(&self, o: &$t) -> bool { *self == *o } }
        impl PartialOrd for $t {
            #[inline(always)] fn lt(&self, o: &$t) -> bool { *self < *o }
            #[inline(always)] fn le(&self, o: &$t) -> bool { *self <= *o }
            #[inline(always)] fn gt(&self, o: &$t) -> bool { *self > *o }
            #[inline(always)] fn ge(&self, o: &$t) -> bool { *self >= *o }
        }
    )* }
}
cmp_impls!(u8 u16 u32 u64 usize i8 i16 i32 i64 isize f32 f64);
impl PartialEq for bool {
    #[inline(always)]
    fn eq(&self, o: &bool) -> bool {
        *self == *o
    }
}
impl<T> PartialEq for *const T {
    #[inline(always)]
    fn eq(&self, o: &*const T) -> bool {
        *self == *o
    }
}
impl<T> PartialEq for *mut T {
    #[inline(always)]
    fn eq(&self, o: &*mut T) -> bool {
        *self == *o
    }
}

#[lang = "index"]
pub trait Index<I> {
    type Output: ?Sized;
    fn index(&self, i: I) -> &Self::Output;
}
#[lang = "index_mut"]
pub trait IndexMut<I>: Index<I> {
    fn index_mut(&mut self, i: I) -> &mut Self::Output;
}
impl<T, const N: usize> Index<usize> for [T; N] {
    type Output = T;
    #[inline(always)]
    fn index(&self, i: usize) -> &T {
        &self[i]
    }
}
impl<T, const N: usize> IndexMut<usize> for [T; N] {
    #[inline(always)]
    fn index_mut(&mut self, i: usize) -> &mut T {
        &mut self[i]
    }
}

/// Panics become `trap` (the kernel aborts with an illegal-instruction error).
#[lang = "panic_location"]
pub struct Location<'a> {
    file: &'a str,
    line: u32,
    col: u32,
}
macro_rules! trap_lang {
    ($($lang:literal $f:ident;)*) => { $(
        #[lang = $lang]
        #[track_caller]
        #[inline(always)]
        fn $f() -> ! { unsafe { asm!("trap;", options(noreturn)) } }
    )* }
}
trap_lang! {
    "panic_const_div_by_zero" p_div0;
    "panic_const_rem_by_zero" p_rem0;
    "panic_const_div_overflow" p_divo;
    "panic_const_rem_overflow" p_remo;
    "panic_const_add_overflow" p_addo;
    "panic_const_sub_overflow" p_subo;
    "panic_const_mul_overflow" p_mulo;
    "panic_const_neg_overflow" p_nego;
    "panic_const_shl_overflow" p_shlo;
    "panic_const_shr_overflow" p_shro;
}
#[lang = "panic_bounds_check"]
#[track_caller]
#[inline(always)]
fn panic_bounds_check(_index: usize, _len: usize) -> ! {
    unsafe { asm!("trap;", options(noreturn)) }
}

#[rustc_builtin_macro]
pub macro asm("assembly template", $(operands,)* $(options($(option),*))?) {
    /* compiler built-in */
}
#[rustc_builtin_macro]
pub macro global_asm("assembly template", $(operands,)* $(options($(option),*))?) {
    /* compiler built-in */
}
#[rustc_builtin_macro]
pub macro concat($($arg:tt)*) {
    /* compiler built-in */
}
#[rustc_builtin_macro]
pub macro stringify($($t:tt)*) {
    /* compiler built-in */
}

#[rustc_intrinsic]
pub unsafe fn offset<P, D>(p: P, d: D) -> P;
#[rustc_intrinsic]
pub unsafe fn transmute<S, D>(s: S) -> D;

/// `ptr.add(n)` as in core (core's inherent method is used on the host).
pub trait PtrAdd {
    unsafe fn add(self, n: usize) -> Self;
}
impl<T> PtrAdd for *const T {
    #[inline(always)]
    unsafe fn add(self, n: usize) -> Self {
        offset(self, n)
    }
}
impl<T> PtrAdd for *mut T {
    #[inline(always)]
    unsafe fn add(self, n: usize) -> Self {
        offset(self, n)
    }
}
