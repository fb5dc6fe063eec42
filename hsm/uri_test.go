package hsm

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestParseURI(t *testing.T) {
	dir := t.TempDir()
	pinFile := filepath.Join(dir, "pin")
	os.WriteFile(pinFile, []byte("1234\n"), 0o600)
	crlf := filepath.Join(dir, "pin-crlf")
	os.WriteFile(crlf, []byte("1234\r\n"), 0o600)
	spaces := filepath.Join(dir, "pin-spaces")
	os.WriteFile(spaces, []byte(" 12 34 "), 0o600)
	t.Setenv("BP_TEST_PIN", "env-pin")
	const mod = "?module-path=/usr/lib/softhsm/libsofthsm2.so"

	for _, tc := range []struct {
		name, uri string
		want      Config
		err       string
	}{
		{name: "softhsm2 file PIN", uri: "pkcs11:token=issuer" + mod + "&pin-source=file:" + pinFile,
			want: Config{Module: "/usr/lib/softhsm/libsofthsm2.so", TokenLabel: "issuer", PIN: "1234"}},
		{name: "file:// form", uri: "pkcs11:token=issuer" + mod + "&pin-source=file://" + pinFile,
			want: Config{Module: "/usr/lib/softhsm/libsofthsm2.so", TokenLabel: "issuer", PIN: "1234"}},
		{name: "bare path", uri: "pkcs11:token=issuer" + mod + "&pin-source=" + crlf,
			want: Config{Module: "/usr/lib/softhsm/libsofthsm2.so", TokenLabel: "issuer", PIN: "1234"}},
		{name: "spaces are kept", uri: "pkcs11:token=issuer" + mod + "&pin-source=file:" + spaces,
			want: Config{Module: "/usr/lib/softhsm/libsofthsm2.so", TokenLabel: "issuer", PIN: " 12 34 "}},
		{name: "env PIN and serial", uri: "pkcs11:serial=b8e3984326502c28" + mod + "&pin-source=env:BP_TEST_PIN",
			want: Config{Module: "/usr/lib/softhsm/libsofthsm2.so", Serial: "b8e3984326502c28", PIN: "env-pin"}},
		{name: "label and serial", uri: "pkcs11:token=a%20b;serial=42" + mod,
			want: Config{Module: "/usr/lib/softhsm/libsofthsm2.so", TokenLabel: "a b", Serial: "42"}},
		{name: "nss", uri: "pkcs11:token=NSS%20Certificate%20DB?module-path=/usr/lib/x86_64-linux-gnu/libsoftokn3.so&x-nss-configdir=/var/lib/issuer/nssdb",
			want: Config{Module: "/usr/lib/x86_64-linux-gnu/libsoftokn3.so", TokenLabel: "NSS Certificate DB",
				InitArgs: "configdir='sql:/var/lib/issuer/nssdb' certPrefix='' keyPrefix='' secmod='secmod.db' flags= "}},

		{name: "table by name", uri: "pkcs11:token=issuer" + mod + "&x-blindperso-table=luna7",
			want: Config{Module: "/usr/lib/softhsm/libsofthsm2.so", TokenLabel: "issuer", Table: "luna7"}},
		{name: "unsuitable table parses", uri: "pkcs11:token=issuer" + mod + "&x-blindperso-table=yubihsm2",
			want: Config{Module: "/usr/lib/softhsm/libsofthsm2.so", TokenLabel: "issuer", Table: "yubihsm2"}},

		{name: "unknown table", uri: "pkcs11:token=issuer" + mod + "&x-blindperso-table=luna", err: `x-blindperso-table: no mechanism table "luna" (known: softhsm2, nss, opencryptoki, luna7`},
		{name: "pin-value", uri: "pkcs11:token=issuer" + mod + "&pin-value=1234", err: "PINs never go in argv or URIs"},
		{name: "no module", uri: "pkcs11:token=issuer", err: "module-path"},
		{name: "relative module", uri: "pkcs11:token=issuer?module-path=libsofthsm2.so", err: `module-path "libsofthsm2.so" must be an absolute path`},
		{name: "no token", uri: "pkcs11:" + mod, err: "token=LABEL or serial=SERIAL"},
		{name: "typo", uri: "pkcs11:tokn=issuer" + mod, err: "unsupported attribute(s) tokn"},
		{name: "object", uri: "pkcs11:token=issuer;object=k" + mod, err: "unsupported attribute(s) object"},
		{name: "unknown query", uri: "pkcs11:token=issuer" + mod + "&module-name=softhsm2", err: "module-name"},
		{name: "not pkcs11", uri: "file:/x", err: "pkcs11"},
		{name: "relative nss dir", uri: "pkcs11:token=x" + mod + "&x-nss-configdir=nssdb", err: "absolute"},
		{name: "quote in nss dir", uri: "pkcs11:token=x" + mod + "&x-nss-configdir=/a'b", err: "quotes"},
		{name: "missing env", uri: "pkcs11:token=x" + mod + "&pin-source=env:BP_NO_SUCH_VAR", err: "not set"},
		{name: "missing file", uri: "pkcs11:token=x" + mod + "&pin-source=file:" + dir + "/nope", err: "no such file"},
		{name: "relative pin file", uri: "pkcs11:token=x" + mod + "&pin-source=file:pin", err: "absolute"},
		{name: "pipe", uri: "pkcs11:token=x" + mod + "&pin-source=%7C/bin/echo", err: "file:/absolute/path or env:VAR"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseURI(tc.uri)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("ParseURI(%q) error = %v, want one containing %q", tc.uri, err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got != tc.want {
				t.Errorf("ParseURI(%q) =\n%+v, want\n%+v", tc.uri, got, tc.want)
			}
		})
	}
}

// The PIN never appears in an error, even when the file holds garbage.
func TestParseURINeverShowsPIN(t *testing.T) {
	dir := t.TempDir()
	pin := filepath.Join(dir, "pin")
	os.WriteFile(pin, []byte("s3cret-pin"), 0o600)
	for _, uri := range []string{
		"pkcs11:token=x?pin-source=file:" + pin,
		"pkcs11:token=x?module-path=/m.so&pin-source=file:" + pin + "&bad=1",
	} {
		_, err := ParseURI(uri)
		if err == nil || strings.Contains(err.Error(), "s3cret") {
			t.Errorf("ParseURI: %v", err)
		}
	}
}
