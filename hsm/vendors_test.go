package hsm

import (
	"errors"
	"strings"
	"testing"

	"github.com/miekg/pkcs11"

	"blindperso/hsm/hsmtest"
)

// Each published row is chosen by the CK_TOKEN_INFO fields its product
// reports (blank padding already trimmed by miekg/pkcs11), and by its key
// in a URI; its vendor codes are the published ones.
func TestPublishedTables(t *testing.T) {
	for _, tc := range []struct {
		key                 string
		manufacturer, model string // "": not published, URI only
		name                string
		wrap5649, wrap3394  uint
		kbkdf               uint
		vendorParams        bool
		trusted             bool
		unsuitable          string // a word the refusal must contain
	}{
		{key: "luna7", manufacturer: "Safenet, Inc.", model: "LunaSA 7.2.0", name: "Thales Luna 7",
			wrap5649: 0x80000171, wrap3394: 0x80000170, kbkdf: 0x80000A02, vendorParams: true},
		{key: "nshield5", manufacturer: "nCipher Corp. Ltd", model: "", name: "Entrust nShield 5",
			wrap5649: 0x210B, wrap3394: pkcs11.CKM_AES_KEY_WRAP, kbkdf: 0x3AC},
		{key: "cloudhsm5", name: "AWS CloudHSM (Client SDK 5)",
			wrap5649: 0x8000216F, wrap3394: 0x80002109, kbkdf: 0x80000001, vendorParams: true, trusted: true},
		{key: "utimaco", manufacturer: "Utimaco IS GmbH", model: "CryptoServer", name: "Utimaco CryptoServer",
			wrap5649: 0x210A, wrap3394: pkcs11.CKM_AES_KEY_WRAP, kbkdf: 0x3AC},
		{key: "yubihsm2", manufacturer: "Yubico (www.yubico.com)", model: "YubiHSM", name: "YubiHSM 2",
			wrap5649: 0x210A, wrap3394: pkcs11.CKM_AES_KEY_WRAP, kbkdf: 0x3AC, unsuitable: "host memory"},
		{key: "gcpkms", manufacturer: "Google", model: "Cloud KMS Token", name: "Google Cloud KMS",
			wrap5649: 0x210A, wrap3394: pkcs11.CKM_AES_KEY_WRAP, kbkdf: 0x3AC, unsuitable: "neither C_WrapKey, C_UnwrapKey nor C_DeriveKey"},
	} {
		t.Run(tc.key, func(t *testing.T) {
			check := func(how string, m *Mechanisms) {
				t.Helper()
				if m.Name != tc.name || m.Key != tc.key || !m.Published || m.Source == "" {
					t.Fatalf("%s: table %q (key %q, published %v, source %q), want %q", how, m.Name, m.Key, m.Published, m.Source, tc.name)
				}
				if m.KeyWrapRFC5649 != tc.wrap5649 || m.AESKeyWrap() != tc.wrap3394 || m.KBKDF() != tc.kbkdf ||
					m.SP800108VendorParams != tc.vendorParams || m.EnforcesWrapWithTrusted != tc.trusted || m.RSAExponent != 65537 {
					t.Errorf("%s: %+v", how, m)
				}
				if (m.Unsuitable != "") != (tc.unsuitable != "") || !strings.Contains(m.Unsuitable, tc.unsuitable) {
					t.Errorf("%s: Unsuitable = %q, want one containing %q", how, m.Unsuitable, tc.unsuitable)
				}
			}
			if tc.manufacturer != "" {
				check("by token info", MechanismsFor(tc.manufacturer, tc.model))
				m, err := TableFor("", tc.manufacturer, tc.model)
				if err != nil {
					t.Fatal(err)
				}
				check("TableFor by token info", m)
			}
			m, err := TableByName(tc.key)
			if err != nil {
				t.Fatal(err)
			}
			check("by name", m)
			// The URI's name wins over the token's own fields.
			if m, err = TableFor(tc.key, "SoftHSM project", "SoftHSM v2"); err != nil {
				t.Fatal(err)
			}
			check("URI over token info", m)
		})
	}
}

// Every published table that is not refused assesses all seven profiles,
// with a reason each; refused tables need none.
func TestPublishedClaims(t *testing.T) {
	profiles := []string{"rsa-raw-sha1", "rsa-oaep-sha1", "rsa-oaep-aes", "ecdh-p256-x963", "ecdh-p256-aes",
		"rsa-oaep-kbkdf", "ecdh-p256-kbkdf"}
	for _, v := range published {
		m := v.table
		if m.Unsuitable != "" || m.Key == "utimaco" {
			continue
		}
		for _, p := range profiles {
			c, ok := m.Claim(p)
			if !ok || c.Why == "" {
				t.Errorf("%s: no claim about %s", m.Name, p)
				continue
			}
			switch c.Verdict {
			case ClaimRuns, ClaimMissing, ClaimUnknown:
			default:
				t.Errorf("%s %s: verdict %q", m.Name, p, c.Verdict)
			}
			if strings.HasSuffix(p, "-kbkdf") && c.Verdict != ClaimMissing && !strings.Contains(c.Why, "CKM_SP800_108_COUNTER_KDF") &&
				!strings.Contains(c.Why, "SP 800-108") {
				t.Errorf("%s %s: a KDF claim that does not name the SP 800-108 mechanism: %q", m.Name, p, c.Why)
			}
		}
		if len(m.Claims) != len(profiles) {
			t.Errorf("%s: %d claims, want %d", m.Name, len(m.Claims), len(profiles))
		}
	}
	luna, _ := TableByName("luna7")
	if c, _ := luna.Claim("ecdh-p256-aes"); c.Verdict != ClaimRuns {
		t.Errorf("luna7 ecdh-p256-aes: %+v", c)
	}
	aws, _ := TableByName("cloudhsm5")
	if c, _ := aws.Claim("rsa-oaep-aes"); c.Verdict != ClaimMissing || !strings.Contains(c.Why, "CKM_AES_ECB_ENCRYPT_DATA") {
		t.Errorf("cloudhsm5 rsa-oaep-aes: %+v", c)
	}
}

// The decision: a table with Unsuitable refuses, with its reason and the
// token's label, as an *UnsuitableError; the others do not.
func TestRefusal(t *testing.T) {
	for _, key := range TableNames() {
		m, err := TableByName(key)
		if err != nil {
			t.Fatal(err)
		}
		err = m.Refusal("issuer")
		refused := key == "yubihsm2" || key == "gcpkms"
		if refused != (err != nil) {
			t.Errorf("%s: Refusal = %v", key, err)
			continue
		}
		if !refused {
			continue
		}
		var ue *UnsuitableError
		if !errors.As(err, &ue) || ue.Token != "issuer" || ue.Table != m.Name || ue.Reason != m.Unsuitable {
			t.Errorf("%s: %#v", key, err)
		}
		msg := err.Error()
		for _, want := range []string{`token "issuer"`, m.Name, m.Unsuitable, "C_UnwrapKey (RSA-OAEP) or C_DeriveKey (ECDH)"} {
			if !strings.Contains(msg, want) {
				t.Errorf("%s: %q lacks %q", key, msg, want)
			}
		}
	}
	// Selected by the fields the product reports, too.
	m := MechanismsFor("Yubico (www.yubico.com)", "YubiHSM")
	if m.Refusal("YubiHSM") == nil {
		t.Error("YubiHSM 2 by token info is not refused")
	}
}

func TestTableNames(t *testing.T) {
	names := TableNames()
	seen := map[string]bool{}
	for _, n := range names {
		if n == "" || seen[n] {
			t.Errorf("table key %q empty or repeated in %v", n, names)
		}
		seen[n] = true
	}
	for _, want := range []string{"softhsm2", "nss", "luna7", "nshield5", "cloudhsm5", "utimaco", "yubihsm2", "gcpkms", "generic"} {
		if !seen[want] {
			t.Errorf("no table %q in %v", want, names)
		}
	}
	if _, err := TableByName("luna"); err == nil || !strings.Contains(err.Error(), "luna7") {
		t.Errorf("TableByName(luna) = %v, want an error listing the names", err)
	}
	// An id must name a manufacturer, or it would match every token.
	for _, v := range vendors {
		for _, id := range v.ids {
			if id.manufacturer == "" {
				t.Errorf("%s: id with no manufacturer", v.table.Name)
			}
		}
	}
	if m := MechanismsFor("", ""); m.Name != "generic" {
		t.Errorf("MechanismsFor(\"\", \"\") = %s", m.Name)
	}
}

func TestVendorMechName(t *testing.T) {
	luna, _ := TableByName("luna7")
	aws, _ := TableByName("cloudhsm5")
	soft, _ := TableByName("softhsm2")
	for _, tc := range []struct {
		m    *Mechanisms
		code uint
		want string
	}{
		{luna, 0x80000171, "CKM_AES_KWP (Luna)"},
		{luna, 0x80000A02, "CKM_NIST_PRF_KDF (Luna)"},
		{aws, 0x8000216F, "CKM_CLOUDHSM_AES_KEY_WRAP_ZERO_PAD"},
		{aws, 0x80000001, "CKM_SP800_108_COUNTER_KDF (CloudHSM)"},
		{soft, 0x80000001, "CKM_0x80000001"},
		{luna, pkcs11.CKM_AES_CMAC, "CKM_AES_CMAC"},
		{soft, 0x3AC, "CKM_SP800_108_COUNTER_KDF"},
	} {
		if got := tc.m.MechName(tc.code); got != tc.want {
			t.Errorf("%s.MechName(0x%X) = %q, want %q", tc.m.Name, tc.code, got, tc.want)
		}
	}
	// Copies do not share the vendor's name map.
	luna.VendorMechNames[0x80000171] = "x"
	if again, _ := TableByName("luna7"); again.MechName(0x80000171) == "x" {
		t.Error("TableByName hands out the shared name map")
	}
}

// On a real token: a URI naming an unsuitable table is refused by Open
// (so by every command), before any session is opened; a URI naming a
// usable one opens with that table.
func TestOpenRefusesUnsuitable(t *testing.T) {
	soft := hsmtest.SoftHSM(t)
	for _, key := range []string{"yubihsm2", "gcpkms"} {
		tok, err := OpenURI(soft.URI+"&x-blindperso-table="+key, 1)
		if err == nil {
			tok.Close()
			t.Fatalf("%s: opened", key)
		}
		var ue *UnsuitableError
		if !errors.As(err, &ue) || ue.Token != soft.Label {
			t.Fatalf("%s: %v", key, err)
		}
		if !strings.Contains(err.Error(), "open token "+`"`+soft.Label+`"`) {
			t.Errorf("%s: %v", key, err)
		}
	}
	tok, err := OpenURI(soft.URI+"&x-blindperso-table=luna7", 1)
	if err != nil {
		t.Fatal(err)
	}
	defer tok.Close()
	if m := tok.Mechanisms(); m.Name != "Thales Luna 7" || !m.Published {
		t.Errorf("table %s", m.Name)
	}
	// The module was released by the refusals: the token still opens
	// with its own table.
	plain, err := OpenURI(soft.URI, 1)
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close()
	if plain.Mechanisms().Name != "SoftHSM2" {
		t.Errorf("table %s", plain.Mechanisms().Name)
	}
}
