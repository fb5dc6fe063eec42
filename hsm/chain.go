package hsm

import (
	"fmt"

	"github.com/miekg/pkcs11"

	"blindperso/protocol"
)

// The in-token chains of docs/PROTOCOL.md §3.4, as data. A chain is a list
// of steps from the card's c to K_I; one engine (derive.go) runs any of
// them. Each step makes exactly one new key object from the previous one
// (the first from the issuer key SK), so the engine can destroy every
// intermediate as soon as the next step has run. Adding a KDF is a profile
// in package protocol, a step value here (with a parameter kind and its
// marshaller if the mechanism needs a new parameter structure) and a table
// entry; the engine does not change. SP 800-108 (kbkdfKI) added one step
// attribute besides its parameter kind, extractableByToken: NSS softokn
// will not make an extractable K_I from a non-extractable S with it.

// stepOp is the PKCS#11 call a step makes.
type stepOp uint8

const (
	// opUnwrap is C_UnwrapKey(mech, SK, c): the transport step for RSA,
	// which puts S into a key object without it ever being plaintext
	// outside the token (C_Decrypt would hand S to the host).
	opUnwrap stepOp = iota + 1
	// opDerive is C_DeriveKey(mech, base): ECDH from SK, or a KDF step
	// from the previous object.
	opDerive
)

// paramKind says how a step's mechanism parameter is built.
type paramKind uint8

const (
	paramNone       paramKind = iota
	paramOAEPSHA1             // CK_RSA_PKCS_OAEP_PARAMS: SHA-1, MGF1-SHA1, empty label
	paramECDH                 // CK_ECDH1_DERIVE_PARAMS: kdf, shared data, public data c
	paramStringData           // CK_KEY_DERIVATION_STRING_DATA (cgo helper)
	// CK_SP800_108_KDF_PARAMS (cgo helper, kbkdf_cgo.go): counter mode,
	// PRF HMAC-SHA256, PRF input u32be(i) ‖ protocol.KBKDFLabel ‖ 0x00 ‖
	// data ‖ u32be(L), L the new key's length in bits.
	paramKBKDF
)

// input names the public bytes a step feeds the token.
type input uint8

const (
	inNone     input = iota
	inC              // the card's ciphertext c (or g^u for ECDH)
	inBinding        // B = protocol.Binding(profile, SPKI)
	inAESBlock       // SHA-256(B)[0:16], the aes KDF's plaintext block
)

// lenOfC, as step.wantLen, means "as long as c": rsa-raw's S is the full
// k-byte block, leading zeros included.
const lenOfC = -1

// step is one PKCS#11 call of a chain.
type step struct {
	name  string // for errors: what the step computes
	op    stepOp
	mech  uint
	param paramKind
	kdf   uint  // CK_EC_KDF_TYPE, for paramECDH
	data  input // the string data (paramStringData), the shared data (paramECDH) or the wrapped bytes (opUnwrap)
	// keyType and valueLen describe the object the step makes. valueLen
	// goes into the template of a derive step (0: the mechanism fixes the
	// length); C_UnwrapKey takes the length from the unwrapped data and
	// tokens refuse CKA_VALUE_LEN there (SoftHSM2: read-only), so for
	// unwrap steps it is 0 and wantLen is checked afterwards instead.
	keyType  uint
	valueLen uint
	// wantLen, if non-zero, is the CKA_VALUE_LEN the new object must have
	// (lenOfC: len(c)). An OAEP ciphertext is not authenticated: anyone
	// with PK can encrypt 16 or 48 bytes instead of 32, and the token
	// would happily make a key of that length. Rejecting it keeps the
	// chain to exactly the KDF the protocol defines.
	wantLen int
	// extractableByToken leaves CKA_EXTRACTABLE out of the new object's
	// template: the token decides. Only for kbkdfKI (see DeriveCardKey):
	// NSS softokn refuses an SP800_108 derivation that would make an
	// extractable key from a non-extractable one
	// (CKR_KEY_FUNCTION_NOT_PERMITTED) and, unasked, makes K_I
	// non-extractable like S, which it still wraps.
	extractableByToken bool
}

// The steps, shared between the chains that use them.
var (
	unwrapRawGeneric = step{name: "unwrap S (RSA X.509)", op: opUnwrap, mech: pkcs11.CKM_RSA_X_509,
		data: inC, keyType: pkcs11.CKK_GENERIC_SECRET, wantLen: lenOfC}
	unwrapOAEPGeneric = step{name: "unwrap S (RSA-OAEP SHA-1)", op: opUnwrap, mech: pkcs11.CKM_RSA_PKCS_OAEP,
		param: paramOAEPSHA1, data: inC, keyType: pkcs11.CKK_GENERIC_SECRET, wantLen: protocol.OAEPSecretLen}
	unwrapOAEPAES = step{name: "unwrap S (RSA-OAEP SHA-1)", op: opUnwrap, mech: pkcs11.CKM_RSA_PKCS_OAEP,
		param: paramOAEPSHA1, data: inC, keyType: pkcs11.CKK_AES, wantLen: protocol.OAEPSecretLen}
	concatB = step{name: "S ‖ B (CONCATENATE_BASE_AND_DATA)", op: opDerive, mech: pkcs11.CKM_CONCATENATE_BASE_AND_DATA,
		param: paramStringData, data: inBinding, keyType: pkcs11.CKK_GENERIC_SECRET}
	sha1KI = step{name: "K_I = SHA-1(S ‖ B) (SHA1_KEY_DERIVATION)", op: opDerive, mech: pkcs11.CKM_SHA1_KEY_DERIVATION,
		keyType: pkcs11.CKK_AES, valueLen: protocol.KeySize}
	aesKI = step{name: "K_I = AES-256_S(SHA-256(B)[0:16]) (AES_ECB_ENCRYPT_DATA)", op: opDerive, mech: pkcs11.CKM_AES_ECB_ENCRYPT_DATA,
		param: paramStringData, data: inAESBlock, keyType: pkcs11.CKK_AES, valueLen: protocol.KeySize}
	ecdhX963KI = step{name: "K_I = X9.63-SHA-1(Z, B) (ECDH1_DERIVE, CKD_SHA1_KDF)", op: opDerive, mech: pkcs11.CKM_ECDH1_DERIVE,
		param: paramECDH, kdf: pkcs11.CKD_SHA1_KDF, data: inBinding, keyType: pkcs11.CKK_AES, valueLen: protocol.KeySize}
	ecdhZ = step{name: "Z (ECDH1_DERIVE, CKD_NULL)", op: opDerive, mech: pkcs11.CKM_ECDH1_DERIVE,
		param: paramECDH, kdf: pkcs11.CKD_NULL, data: inNone, keyType: pkcs11.CKK_AES, valueLen: 32}
	// Z as a generic secret: the key of an HMAC PRF (PKCS#11 HMAC takes
	// CKK_GENERIC_SECRET keys).
	ecdhZGeneric = step{name: "Z (ECDH1_DERIVE, CKD_NULL)", op: opDerive, mech: pkcs11.CKM_ECDH1_DERIVE,
		param: paramECDH, kdf: pkcs11.CKD_NULL, data: inNone, keyType: pkcs11.CKK_GENERIC_SECRET, valueLen: 32}
	kbkdfKI = step{name: "K_I = SP 800-108 counter KDF, HMAC-SHA256, key S, context B (SP800_108_COUNTER_KDF)", op: opDerive,
		mech: MechSP800108CounterKDF, param: paramKBKDF, data: inBinding, keyType: pkcs11.CKK_AES, valueLen: protocol.KeySize,
		extractableByToken: true}
)

// chains maps a profile name to its steps (docs/PROTOCOL.md §3.4). The last
// step's object is K_I.
var chains = map[string][]step{
	protocol.RSARawSHA1.Name:   {unwrapRawGeneric, concatB, sha1KI},
	protocol.RSAOAEPSHA1.Name:  {unwrapOAEPGeneric, concatB, sha1KI},
	protocol.RSAOAEPAES.Name:   {unwrapOAEPAES, aesKI},
	protocol.ECDHP256X963.Name: {ecdhX963KI},
	protocol.ECDHP256AES.Name:  {ecdhZ, aesKI},
	// The base key of kbkdfKI must be a generic secret (HMAC key): S
	// unwrapped as one, Z derived as one.
	protocol.RSAOAEPKBKDF.Name:  {unwrapOAEPGeneric, kbkdfKI},
	protocol.ECDHP256KBKDF.Name: {ecdhZGeneric, kbkdfKI},
}

func chainFor(p protocol.Profile) ([]step, error) {
	c, ok := chains[p.Name]
	if !ok {
		return nil, fmt.Errorf("profile %q has no in-token chain", p.Name)
	}
	return c, nil
}

// ChainStep describes one step of a profile's chain for a capability
// probe: the mechanism, and for ECDH the KDF it is asked to run (a token
// may do ECDH1_DERIVE with CKD_NULL but not with CKD_SHA1_KDF).
type ChainStep struct {
	Name      string
	Mechanism uint // CKM_…
	ECKDF     uint // CKD_… for CKM_ECDH1_DERIVE, else 0
	KeyType   uint // CKK_… of the object the step makes
}

// ChainSteps lists, in order, what the token must perform to derive K_I
// for profile p. Wrapping (Mechanisms.KeyWrapRFC5649) and authentication
// (CKM_AES_CMAC) come on top.
func ChainSteps(p protocol.Profile) ([]ChainStep, error) {
	c, err := chainFor(p)
	if err != nil {
		return nil, err
	}
	out := make([]ChainStep, len(c))
	for i, st := range c {
		out[i] = ChainStep{Name: st.name, Mechanism: st.mech, ECKDF: st.kdf, KeyType: st.keyType}
	}
	return out, nil
}
