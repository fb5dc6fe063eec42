package hsm

import (
	"fmt"
	"strings"

	"github.com/miekg/pkcs11"
)

// MechAESKeyWrapKWP is CKM_AES_KEY_WRAP_KWP (PKCS#11 3.0): RFC 5649 in NSS
// softokn. miekg/pkcs11 v1.1.2 predates it, so it has no constant.
const MechAESKeyWrapKWP uint = 0x210B

// mechNames names the mechanisms this project uses, so that errors and the
// probe can say "CKM_SHA1_KEY_DERIVATION" rather than "0x392".
var mechNames = map[uint]string{
	pkcs11.CKM_RSA_PKCS_KEY_PAIR_GEN:     "CKM_RSA_PKCS_KEY_PAIR_GEN",
	pkcs11.CKM_RSA_PKCS:                  "CKM_RSA_PKCS",
	pkcs11.CKM_RSA_X_509:                 "CKM_RSA_X_509",
	pkcs11.CKM_RSA_PKCS_OAEP:             "CKM_RSA_PKCS_OAEP",
	pkcs11.CKM_EC_KEY_PAIR_GEN:           "CKM_EC_KEY_PAIR_GEN",
	pkcs11.CKM_ECDH1_DERIVE:              "CKM_ECDH1_DERIVE",
	pkcs11.CKM_AES_KEY_GEN:               "CKM_AES_KEY_GEN",
	pkcs11.CKM_AES_ECB:                   "CKM_AES_ECB",
	pkcs11.CKM_AES_CMAC:                  "CKM_AES_CMAC",
	pkcs11.CKM_AES_ECB_ENCRYPT_DATA:      "CKM_AES_ECB_ENCRYPT_DATA",
	pkcs11.CKM_AES_KEY_WRAP:              "CKM_AES_KEY_WRAP",
	pkcs11.CKM_AES_KEY_WRAP_PAD:          "CKM_AES_KEY_WRAP_PAD",
	MechAESKeyWrapKWP:                    "CKM_AES_KEY_WRAP_KWP",
	pkcs11.CKM_GENERIC_SECRET_KEY_GEN:    "CKM_GENERIC_SECRET_KEY_GEN",
	pkcs11.CKM_CONCATENATE_BASE_AND_DATA: "CKM_CONCATENATE_BASE_AND_DATA",
	pkcs11.CKM_SHA1_KEY_DERIVATION:       "CKM_SHA1_KEY_DERIVATION",
	pkcs11.CKM_SHA256_KEY_DERIVATION:     "CKM_SHA256_KEY_DERIVATION",
	pkcs11.CKM_SHA_1:                     "CKM_SHA_1",
	pkcs11.CKM_SHA256:                    "CKM_SHA256",
}

// MechName returns the CKM_ name of a mechanism code, or its hex code if
// the table does not know it.
func MechName(m uint) string {
	if n, ok := mechNames[m]; ok {
		return n
	}
	return fmt.Sprintf("CKM_0x%X", m)
}

// vendor selects a table by the CK_TOKEN_INFO manufacturerID and model
// (prefix match, after the library's trimming of blank padding).
type vendor struct {
	manufacturer, model string
	table               Mechanisms
}

// vendors is the per-token table. To support a new token, add a line here
// (the manufacturer and model exactly as `issuer probe` prints them), then
// run `issuer probe` against it and record its output in docs/HSM.md.
var vendors = []vendor{
	{"SoftHSM", "SoftHSM v2", Mechanisms{
		Name:                    "SoftHSM2",
		KeyWrapRFC5649:          pkcs11.CKM_AES_KEY_WRAP_PAD,
		RSAExponent:             3,
		EnforcesWrapWithTrusted: true,
		KnowsCopyable:           true,
		UnwrapLenSilent:         true,
		// No CKA_DERIVE_TEMPLATE, derived keys do not inherit
		// sensitivity, and C_DigestKey takes sensitive keys.
		OpenPaths: []string{"s-derive-extractable", "s-digest-key", "ec-derive-extractable"},
	}},
	{"Mozilla Foundation", "NSS 3", Mechanisms{
		Name:           "NSS softokn",
		KeyWrapRFC5649: MechAESKeyWrapKWP,
		// NSS softokn refuses e = 3 (CKR_ARGUMENTS_BAD).
		RSAExponent: 65537,
		// The "NSS Certificate DB" slot performs these but omits them
		// from its mechanism list (`issuer probe`, NSS 3.87).
		UnlistedButWorking: []uint{pkcs11.CKM_CONCATENATE_BASE_AND_DATA, pkcs11.CKM_SHA1_KEY_DERIVATION,
			pkcs11.CKM_AES_ECB_ENCRYPT_DATA},
		// NSS softokn 3.87 wraps keys whose CKA_EXTRACTABLE is false,
		// ignores CKA_UNWRAP_TEMPLATE, does not enforce
		// CKA_WRAP_WITH_TRUSTED, knows no CKA_COPYABLE and makes a copy
		// modifiable on request: only attribute changes on the original
		// are refused.
		OpenPaths: []string{"kek-copy-decrypt", "kek-copy-modifiable", "kek-wrap-under-own-key",
			"blob-unwrap-extractable", "blob-unwrap-wrap-under-own-key", "blob-wrap-under-own-trusted-key",
			"sk-copy-decrypt", "sk-copy-modifiable", "sk-wrap-under-own-key",
			"s-unwrap-extractable", "s-unwrap-encrypt", "s-unwrap-wrap-under-own-key", "s-derive-extractable", "s-digest-key",
			"ec-derive-extractable", "ec-wrap-under-own-key", "transcript-copy-extractable", "transcript-wrap-under-own-key"},
	}},
}

// generic is the table of a token nobody has measured: the PKCS#11 v2.40
// code for RFC 5649, the exponent every token accepts, and no claim about
// CKA_WRAP_WITH_TRUSTED. `issuer probe` checks each of these by trial.
var generic = Mechanisms{
	Name:           "generic",
	KeyWrapRFC5649: pkcs11.CKM_AES_KEY_WRAP_PAD,
	RSAExponent:    65537,
}

// MechanismsFor returns (a copy of) the table for a token identified by its
// CK_TOKEN_INFO manufacturerID and model, or the generic table.
func MechanismsFor(manufacturer, model string) *Mechanisms {
	for _, v := range vendors {
		if strings.HasPrefix(manufacturer, v.manufacturer) && strings.HasPrefix(model, v.model) {
			return cloneMechanisms(v.table)
		}
	}
	return cloneMechanisms(generic)
}

func cloneMechanisms(m Mechanisms) *Mechanisms {
	m.UnlistedButWorking = append([]uint(nil), m.UnlistedButWorking...)
	m.OpenPaths = append([]string(nil), m.OpenPaths...)
	return &m
}

// Unlisted reports whether the table says the token performs mechanism m
// although its mechanism list omits it.
func (m *Mechanisms) Unlisted(mech uint) bool {
	for _, u := range m.UnlistedButWorking {
		if u == mech {
			return true
		}
	}
	return false
}
