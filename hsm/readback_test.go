package hsm

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/miekg/pkcs11"

	"blindperso/protocol"
)

// The attributes of docs/HSM.md §6's read-back table, in its row order.
var readbackAttrs = []uint{
	pkcs11.CKA_TOKEN, pkcs11.CKA_PRIVATE, pkcs11.CKA_SENSITIVE, pkcs11.CKA_EXTRACTABLE,
	pkcs11.CKA_ALWAYS_SENSITIVE, pkcs11.CKA_NEVER_EXTRACTABLE, pkcs11.CKA_MODIFIABLE, pkcs11.CKA_COPYABLE,
	pkcs11.CKA_ENCRYPT, pkcs11.CKA_DECRYPT, pkcs11.CKA_SIGN, pkcs11.CKA_VERIFY, pkcs11.CKA_SIGN_RECOVER,
	pkcs11.CKA_VERIFY_RECOVER, pkcs11.CKA_WRAP, pkcs11.CKA_UNWRAP, pkcs11.CKA_DERIVE,
	pkcs11.CKA_WRAP_WITH_TRUSTED, pkcs11.CKA_TRUSTED,
}

// The objects of the table, in its column order.
var readbackObjects = []string{"RSA SK", "EC SK", "issuer PK", "KEK", "transcript SK", "transcript PK", "S", "Z", "K_I", "K_I (verify)"}

// readback reads every CK_BBOOL of readbackAttrs of every object this
// package creates, made the way the product makes them: keys by the
// generation functions (the ceremony's), S, Z and K_I by the chains
// (seen through auditStep), the verification key by macKeyTemplate.
// A cell is "true", "false" or "—" (the token answers no value).
func readback(t *testing.T, tok *Token) map[string]map[uint]string {
	ctx := context.Background()
	out := map[string]map[uint]string{}
	read := func(s Session, obj string, h pkcs11.ObjectHandle) {
		m := map[uint]string{}
		for _, typ := range readbackAttrs {
			a, err := s.P.GetAttributeValue(s.H, h, []*pkcs11.Attribute{attr(typ, nil)})
			switch {
			case err != nil || len(a[0].Value) != 1:
				m[typ] = "—"
			default:
				m[typ] = fmt.Sprint(a[0].Value[0] != 0)
			}
		}
		out[obj] = m
	}
	rsaKey, err := tok.GenerateIssuerKey(ctx, KindRSA2048, uniqueLabel("rb-rsa"))
	if err != nil {
		t.Fatal(err)
	}
	ecKey, err := tok.GenerateIssuerKey(ctx, KindP256, uniqueLabel("rb-ec"))
	if err != nil {
		t.Fatal(err)
	}
	kek, err := tok.GenerateKEK(ctx, uniqueLabel("rb-kek"), soPIN(tok))
	if err != nil {
		t.Fatal(err)
	}
	tk, err := tok.GenerateSigningKey(ctx, uniqueLabel("rb-tk"))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { auditStep = nil }()
	err = tok.With(ctx, func(s Session) error {
		for obj, h := range map[string]func() (pkcs11.ObjectHandle, error){
			"RSA SK":        func() (pkcs11.ObjectHandle, error) { return rsaKey.Handle(s) },
			"EC SK":         func() (pkcs11.ObjectHandle, error) { return ecKey.Handle(s) },
			"issuer PK":     func() (pkcs11.ObjectHandle, error) { return findOne(s, publicKeyFind(ecKey.ID), "public key") },
			"KEK":           func() (pkcs11.ObjectHandle, error) { return kek.Handle(s) },
			"transcript SK": func() (pkcs11.ObjectHandle, error) { return tk.Handle(s) },
			"transcript PK": func() (pkcs11.ObjectHandle, error) { return findOne(s, publicKeyFind(tk.ID), "public key") },
		} {
			hh, err := h()
			if err != nil {
				return err
			}
			read(s, obj, hh)
		}
		if pub, err := findOne(s, publicKeyFind(rsaKey.ID), "public key"); err != nil {
			return err
		} else {
			read(s, "RSA PK", pub) // must equal issuer PK: checked below
		}
		kh, _ := kek.Handle(s)
		for _, c := range []struct {
			p   protocol.Profile
			key *IssuerKeyRef
			obj []string // what each step makes
		}{
			{protocol.RSAOAEPAES, rsaKey, []string{"S", ""}},
			{protocol.ECDHP256AES, ecKey, []string{"Z", "K_I"}},
		} {
			auditStep = func(s Session, _ protocol.Profile, i int, h pkcs11.ObjectHandle) {
				if c.obj[i] != "" {
					read(s, c.obj[i], h)
				}
			}
			card := newSoftCard(t, c.p, c.key.Public)
			sk, _ := c.key.Handle(s)
			blob, err := ImportCard(s, c.p, sk, kh, c.key.Public.SPKI, card.c)
			if err != nil {
				return err
			}
			auditStep = nil
			_, bySign := cmacBySign.Load(s.M)
			bySign = bySign || tok.Mechanisms().Name == "NSS softokn"
			m := pkcs11.NewMechanism(s.M.KeyWrapRFC5649, nil)
			ki, err := s.P.UnwrapKey(s.H, []*pkcs11.Mechanism{m}, kh, blob.Wrapped, macKeyTemplate(bySign))
			if err != nil {
				return err
			}
			read(s, "K_I (verify)", ki)
			s.P.DestroyObject(s.H, ki)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(out["RSA PK"]) != fmt.Sprint(out["issuer PK"]) {
		t.Errorf("RSA and EC issuer public keys differ: %v, %v", out["RSA PK"], out["issuer PK"])
	}
	return out
}

// TestReadbackMatchesDoc: docs/HSM.md §6's read-back table is what
// C_GetAttributeValue gives on both tokens, attribute by attribute. A
// cell "x" holds on both tokens; "S: x, N: y" gives SoftHSM2's and NSS's.
// BLINDPERSO_PRINT_READBACK=1 prints the measured table.
func TestReadbackMatchesDoc(t *testing.T) {
	toks := openBoth(t, 1)
	got := map[string]map[string]map[uint]string{}
	for name, tok := range toks {
		got[name] = readback(t, tok)
	}
	cell := func(obj string, typ uint) string {
		s, n := got["SoftHSM2"][obj][typ], got["NSS"][obj][typ]
		if s == n {
			return s
		}
		return "S: " + s + ", N: " + n
	}
	if os.Getenv("BLINDPERSO_PRINT_READBACK") != "" {
		fmt.Printf("| attribute | %s |\n|---%s|\n", strings.Join(readbackObjects, " | "), strings.Repeat("|---", len(readbackObjects)))
		for _, typ := range readbackAttrs {
			row := []string{AttrName(typ)}
			for _, obj := range readbackObjects {
				row = append(row, cell(obj, typ))
			}
			fmt.Printf("| %s |\n", strings.Join(row, " | "))
		}
	}
	doc := docReadback(t)
	for _, typ := range readbackAttrs {
		for _, obj := range readbackObjects {
			want, ok := doc[AttrName(typ)][obj]
			if !ok {
				t.Errorf("docs/HSM.md §6 has no cell for %s of %s", AttrName(typ), obj)
				continue
			}
			if g := cell(obj, typ); g != want {
				t.Errorf("%s of %s: the token reads back %q, docs/HSM.md §6 says %q", AttrName(typ), obj, g, want)
			}
		}
	}
}

// docReadback parses the table between <!-- readback --> and
// <!-- /readback --> in docs/HSM.md: attribute → object → cell.
func docReadback(t *testing.T) map[string]map[string]string {
	b, err := os.ReadFile(filepath.Join("..", "docs", "HSM.md"))
	if err != nil {
		t.Fatal(err)
	}
	s := string(b)
	i, j := strings.Index(s, "<!-- readback -->"), strings.Index(s, "<!-- /readback -->")
	if i < 0 || j < i {
		t.Fatal("docs/HSM.md has no <!-- readback --> table")
	}
	var header []string
	out := map[string]map[string]string{}
	for _, line := range strings.Split(strings.TrimSpace(s[i+len("<!-- readback -->"):j]), "\n") {
		cells := strings.Split(strings.Trim(strings.TrimSpace(line), "|"), "|")
		for k := range cells {
			cells[k] = strings.Trim(strings.TrimSpace(cells[k]), "`")
		}
		switch {
		case header == nil:
			header = cells
		case strings.HasPrefix(cells[0], "---"):
		default:
			row := map[string]string{}
			for k := 1; k < len(cells) && k < len(header); k++ {
				row[header[k]] = cells[k]
			}
			out[cells[0]] = row
		}
	}
	if got := header[1:]; strings.Join(got, ",") != strings.Join(readbackObjects, ",") {
		t.Fatalf("docs/HSM.md read-back columns %v, want %v", got, readbackObjects)
	}
	return out
}
