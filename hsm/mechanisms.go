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
	MechSP800108CounterKDF:               "CKM_SP800_108_COUNTER_KDF",
}

// MechName returns the CKM_ name of a mechanism code, or its hex code if
// the table does not know it.
func MechName(m uint) string {
	if n, ok := mechNames[m]; ok {
		return n
	}
	return fmt.Sprintf("CKM_0x%X", m)
}

// vendor is one table and the tokens it is for: the CK_TOKEN_INFO
// manufacturerID and model prefixes (after the library's trimming of blank
// padding) that select it, and the key a URI names it by
// (x-blindperso-table=KEY). A vendor with no ids is chosen only by its key.
type vendor struct {
	ids   []tokenID
	table Mechanisms
}

type tokenID struct{ manufacturer, model string }

// vendors is the per-token table: the measured rows here, then the
// published ones (vendors.go). To support a new token, add a line (the
// manufacturer and model exactly as `issuer probe` prints them), then run
// `issuer probe` against it and record its output in docs/HSM.md.
var vendors = append(measured, published...)

var measured = []vendor{
	{[]tokenID{{"SoftHSM", "SoftHSM v2"}}, Mechanisms{
		Name:                    "SoftHSM2",
		Key:                     "softhsm2",
		KeyWrapRFC5649:          pkcs11.CKM_AES_KEY_WRAP_PAD,
		RSAExponent:             3,
		EnforcesWrapWithTrusted: true,
		KnowsCopyable:           true,
		UnwrapLenSilent:         true,
		// No CKA_DERIVE_TEMPLATE, derived keys do not inherit
		// sensitivity, and C_DigestKey takes sensitive keys.
		OpenPaths: []string{"s-derive-extractable", "s-digest-key", "ec-derive-extractable"},
	}},
	{[]tokenID{{"Mozilla Foundation", "NSS 3"}}, Mechanisms{
		Name:           "NSS softokn",
		Key:            "nss",
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
			"ec-derive-extractable", "ec-wrap-under-own-key", "transcript-copy-extractable", "transcript-wrap-under-own-key",
			"ktk-unwrap-extractable", "ktk-unwrap-unwrapper", "ktk-wrap-under-own-key", "blob-export-under-own-ktk"},
	}},
	{[]tokenID{{"IBM Corp.", "IBM SoftTok"}}, Mechanisms{
		Name: "opencryptoki soft token",
		Key:  "opencryptoki",
		// 3.8.1 has no AES key wrap under any code point, no AES-CMAC,
		// no EC and no secret-key derivation: it runs no profile, and
		// the ceremony refuses it (docs/HSM.md, "opencryptoki").
		KeyWrapRFC5649: pkcs11.CKM_AES_KEY_WRAP_PAD,
		RSAExponent:    3,
		// It knows neither CKA_WRAP_WITH_TRUSTED, CKA_COPYABLE,
		// CKA_DERIVE_TEMPLATE nor CKA_UNWRAP_TEMPLATE, and C_UnwrapKey
		// makes every secret non-sensitive and extractable whatever the
		// template asks: a holder of the user PIN reads S. OpenPaths is
		// nil: the ceremony's keys cannot be made there, so the
		// adversary's matrix cannot run (package pinholder's
		// opencryptoki test runs what it can).
	}},
}

// generic is the table of a token nobody has measured: the PKCS#11 v2.40
// code for RFC 5649, the exponent every token accepts, and no claim about
// CKA_WRAP_WITH_TRUSTED. `issuer probe` checks each of these by trial.
var generic = Mechanisms{
	Name:           "generic",
	Key:            "generic",
	KeyWrapRFC5649: pkcs11.CKM_AES_KEY_WRAP_PAD,
	RSAExponent:    65537,
}

// MechanismsFor returns (a copy of) the table for a token identified by its
// CK_TOKEN_INFO manufacturerID and model, or the generic table.
func MechanismsFor(manufacturer, model string) *Mechanisms {
	for _, v := range vendors {
		for _, id := range v.ids {
			// An id without a manufacturer would match every token.
			if id.manufacturer != "" && strings.HasPrefix(manufacturer, id.manufacturer) && strings.HasPrefix(model, id.model) {
				return cloneMechanisms(v.table)
			}
		}
	}
	return cloneMechanisms(generic)
}

// TableNames lists the keys x-blindperso-table accepts, in table order.
func TableNames() []string {
	names := make([]string, 0, len(vendors)+1)
	for _, v := range vendors {
		names = append(names, v.table.Key)
	}
	return append(names, generic.Key)
}

// TableByName returns (a copy of) the table whose Key is name.
func TableByName(name string) (*Mechanisms, error) {
	for _, v := range vendors {
		if v.table.Key == name {
			return cloneMechanisms(v.table), nil
		}
	}
	if name == generic.Key {
		return cloneMechanisms(generic), nil
	}
	return nil, fmt.Errorf("no mechanism table %q (known: %s)", name, strings.Join(TableNames(), ", "))
}

// TableFor chooses the table of a token: the one a URI names
// (x-blindperso-table, Config.Table) if any, else the one its
// CK_TOKEN_INFO fields select. It does not refuse an unsuitable token;
// Refusal does.
func TableFor(name, manufacturer, model string) (*Mechanisms, error) {
	if name != "" {
		return TableByName(name)
	}
	return MechanismsFor(manufacturer, model), nil
}

// UnsuitableError refuses a token whose table says it cannot hold the
// issuer's keys (Mechanisms.Unsuitable).
type UnsuitableError struct {
	Token  string // the token's label
	Table  string // the table's Name
	Reason string
}

func (e *UnsuitableError) Error() string {
	return fmt.Sprintf("refused for the issuer's keys (token %q, mechanism table %q): %s", e.Token, e.Table, e.Reason)
}

// Refusal is the error that refuses the token labelled label if its
// table says it is unsuitable, else nil. Open calls it before logging in,
// so every command that opens a token for issuer work (probe, keygen,
// kek, import, serve, ceremony, …) refuses it the same way.
func (m *Mechanisms) Refusal(label string) error {
	if m.Unsuitable == "" {
		return nil
	}
	return &UnsuitableError{Token: label, Table: m.Name, Reason: m.Unsuitable}
}

// AESKeyWrap is the token's code for AES key wrap without padding (RFC 3394).
func (m *Mechanisms) AESKeyWrap() uint {
	if m.KeyWrapRFC3394 != 0 {
		return m.KeyWrapRFC3394
	}
	return pkcs11.CKM_AES_KEY_WRAP
}

// KBKDF is the token's code for the SP 800-108 counter-mode KDF; see
// SP800108VendorParams before passing it PKCS#11 3.0 parameters.
func (m *Mechanisms) KBKDF() uint {
	if m.SP800108Counter != 0 {
		return m.SP800108Counter
	}
	return MechSP800108CounterKDF
}

// Claim returns the published claim about profile, if the table has one.
func (m *Mechanisms) Claim(profile string) (ProfileClaim, bool) {
	for _, c := range m.Claims {
		if c.Profile == profile {
			return c, true
		}
	}
	return ProfileClaim{}, false
}

// MechName names a mechanism code as this token's vendor does, falling
// back to the PKCS#11 names (package func MechName).
func (m *Mechanisms) MechName(code uint) string {
	if n, ok := m.VendorMechNames[code]; ok {
		return n
	}
	return MechName(code)
}

func cloneMechanisms(m Mechanisms) *Mechanisms {
	m.UnlistedButWorking = append([]uint(nil), m.UnlistedButWorking...)
	m.OpenPaths = append([]string(nil), m.OpenPaths...)
	m.Claims = append([]ProfileClaim(nil), m.Claims...)
	if m.VendorMechNames != nil {
		names := make(map[uint]string, len(m.VendorMechNames))
		for k, v := range m.VendorMechNames {
			names[k] = v
		}
		m.VendorMechNames = names
	}
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
