// Package hsm is the issuer's side of the protocol inside a PKCS#11 token:
// opening tokens, generating the issuer's keys, and the in-token chains
// that turn a card's c into K_I, wrap K_I for storage and verify a card's
// MAC — without K_I, r or S ever reaching the host.
//
// Rules every file here follows (docs/HSM.md has the why):
//   - no code path reads the value attribute of a card key or an intermediate;
//   - C_Decrypt is never used on a card ciphertext: S is unwrapped or
//     derived into a token object;
//   - no key material is imported from the host (C_CreateObject with a
//     value attribute) outside tests;
//   - every intermediate object is destroyed, on success and on error.
package hsm

import "github.com/miekg/pkcs11"

// Session is one logged-in PKCS#11 session borrowed from a Token's pool.
// It is valid only inside the function passed to Token.With.
type Session struct {
	P *pkcs11.Ctx
	H pkcs11.SessionHandle
	// M is the token's mechanism table.
	M *Mechanisms
	// module is the library's path, for the few calls made past
	// miekg/pkcs11 (wrap_cgo.go).
	module string
}

// Mechanisms is the per-token table: the mechanism codes that differ from
// token to token, and the token's known quirks. It is the only place such
// facts live; chains and the probe read them from here.
type Mechanisms struct {
	// Name says which table this is ("SoftHSM2", "NSS softokn", "generic").
	Name string
	// Key names the table in a token URI (x-blindperso-table=KEY), for a
	// token whose CK_TOKEN_INFO fields do not select it ("softhsm2",
	// "luna7", …; TableNames lists them).
	Key string
	// Published: the facts of this table come from the vendor's published
	// documentation (Source), not from `issuer probe` on the token. The
	// probe's trials still decide; where they disagree with the table the
	// probe says so, and the row is corrected and marked measured.
	Published bool
	// Source says where a published table's facts come from and what the
	// pages say (docs/HSM.md, "Published vendor tables", has the long form).
	Source string
	// Unsuitable, when set, says why the token cannot hold the issuer's
	// keys without putting a secret into host memory. Open refuses such a
	// token before logging in, with this sentence (UnsuitableError).
	Unsuitable string
	// KeyWrapRFC5649 is the code of AES key wrap with padding as in
	// RFC 5649: CKM_AES_KEY_WRAP_PAD (0x210A) in SoftHSM2, 0x210B
	// (CKM_AES_KEY_WRAP_KWP) in NSS, whose 0x210A is RFC 3394 + PKCS#7.
	KeyWrapRFC5649 uint
	// KeyWrapRFC3394 is the code of AES key wrap without padding (RFC
	// 3394) where the vendor's differs from CKM_AES_KEY_WRAP (0x2109):
	// Luna's CKM_AES_KW 0x80000170, CloudHSM's
	// CKM_CLOUDHSM_AES_KEY_WRAP_NO_PAD 0x80002109. 0: 0x2109 (AESKeyWrap).
	// K_I is 16 bytes, so RFC 3394 wraps it as well as RFC 5649 does.
	KeyWrapRFC3394 uint
	// SP800108Counter is the code of the token's SP 800-108 counter-mode
	// KDF where it differs from PKCS#11 3.0's CKM_SP800_108_COUNTER_KDF
	// (0x3AC): Luna's CKM_NIST_PRF_KDF 0x80000A02, CloudHSM's 0x80000001.
	// 0: 0x3AC, if the token has it at all (KBKDF; the probe decides).
	SP800108Counter uint
	// SP800108VendorParams: SP800108Counter takes the vendor's own
	// parameter structure, not PKCS#11 3.0's CK_SP800_108_KDF_PARAMS, so
	// a chain written for the standard mechanism cannot just swap the code.
	SP800108VendorParams bool
	// VendorMechNames names this vendor's own mechanism codes (vendor
	// codes collide between vendors: 0x80000001 is CloudHSM's SP 800-108
	// KDF and Utimaco's CKM_RSA_PKCS_MULTI). See (*Mechanisms).MechName.
	VendorMechNames map[uint]string
	// Claims is what the published documentation says about each of the
	// project's profiles on this token (nil: measured tables, where the
	// probe's profile matrix is the record).
	Claims []ProfileClaim
	// UnlistedButWorking lists mechanisms the token performs although its
	// mechanism list omits them (NSS's "NSS Certificate DB" slot:
	// CONCATENATE_BASE_AND_DATA, SHA1_KEY_DERIVATION). The probe confirms
	// them by trial on throwaway session objects before relying on them.
	UnlistedButWorking []uint
	// RSAExponent is the public exponent the token can generate for the
	// issuer key: 3 (the paper's choice) where allowed, else 65537.
	RSAExponent int
	// EnforcesWrapWithTrusted: the token refuses to wrap a key that has
	// CKA_WRAP_WITH_TRUSTED under a key that is not CKA_TRUSTED.
	EnforcesWrapWithTrusted bool
	// KnowsCopyable: the token accepts CKA_COPYABLE (PKCS#11 2.40) in a
	// key template. NSS softokn 3.87 answers CKR_GENERAL_ERROR to it.
	KnowsCopyable bool
	// KnowsDeriveTemplate: the token accepts CKA_DERIVE_TEMPLATE (PKCS#11
	// 3.0). Neither SoftHSM2 2.6.1 (CKR_ATTRIBUTE_TYPE_INVALID) nor NSS
	// softokn 3.87 (CKR_GENERAL_ERROR) does.
	KnowsDeriveTemplate bool
	// UnwrapLenSilent: the token reports CKA_VALUE_LEN 0 for a key made by
	// C_UnwrapKey (SoftHSM2 2.6.1), so the length of an unwrapped S is
	// checked by wrapping S under the trusted KEK instead (derive.go).
	UnwrapLenSilent bool
	// OpenPaths are the ways out that a holder of the user PIN still has
	// on this token with keys made as the ceremony makes them, because the
	// token lacks the control that would close them (package pinholder's
	// path IDs, as `issuer probe` measures them; its tests hold this list
	// equal to what the token does). nil: not measured.
	OpenPaths []string
}

// ProfileClaim is a published table's assessment of one profile: whether
// the vendor's published mechanism list has every step of the profile's
// chain (docs/PROTOCOL.md §3.4), and which mechanism decides it.
type ProfileClaim struct {
	Profile string
	Verdict ClaimVerdict
	// Why names the mechanisms that make it run, or the missing one.
	Why string
}

// ClaimVerdict is the published answer for a profile.
type ClaimVerdict string

// Published verdicts. ClaimUnknown: the pages read do not settle it (a
// footnote not read, a vendor code not published); the probe decides.
const (
	ClaimRuns    ClaimVerdict = "runs"
	ClaimMissing ClaimVerdict = "does not run"
	ClaimUnknown ClaimVerdict = "unknown"
)
