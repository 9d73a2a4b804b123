// render_template executes Ollama TEMPLATEs and reads Modelfiles the way Ollama does.
//
// Standard library only; built on demand by mlx_lora.ollama_go (verify's Modelfile check and the
// tests). Written from what Ollama's server/routes.go, template/template.go and parser/parser.go
// do (facts, not their code):
//
//   - a chat request that does not start with a system message gets the Modelfile's SYSTEM
//     (when non-empty) as a leading system message;
//   - consecutive messages of one role are joined with "\n\n"; .System is all system contents
//     joined with "\n\n";
//   - a template that mentions .Messages is executed once with System, Messages (Role, Content,
//     Thinking, ...), Tools, Response "", Think, ThinkLevel, IsThinkSet, with missingkey=zero and
//     the functions json, currentDate and yesterdayDate (dates as 2006-01-02, local time);
//   - any other template is a legacy one: {{ .Response }} is appended when it names neither
//     .Messages nor .Response; it runs once per system/user/assistant group with .System, .Prompt
//     and .Response, and the last run stops where .Response first appears;
//   - think: null leaves Think false and IsThinkSet false; true gives Think, ThinkLevel "medium";
//   - a Modelfile value is a bare word, "..." or """...""" without escapes; it ends at the first
//     line end where the trimmed text so far is complete; runes that strconv.IsPrint rejects are
//     dropped unless they are spaces, tabs or line ends inside an unfinished value.
//
// Usage:
//
//	render_template render  < [{"template", "system", "messages": [{"role", "content", "thinking"}],
//	                            "think": null|true|false}]
//	                        > [{"prompt": "...", "error": "..."}]
//	render_template parse   < ["Modelfile text", ...]
//	                        > [{"commands": [{"name", "args"}], "error": "..."}]
package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"text/template"
	"text/template/parse"
	"time"
)

type message struct {
	Role     string `json:"role"`
	Content  string `json:"content"`
	Thinking string `json:"thinking"`
}

// templateMessage has the fields Ollama gives a template for each message.
type templateMessage struct {
	Role       string
	Content    string
	Thinking   string
	Images     []string
	ToolCalls  []any
	ToolName   string
	ToolCallID string
}

type renderCase struct {
	Template string    `json:"template"`
	System   string    `json:"system"`
	Messages []message `json:"messages"`
	Think    *bool     `json:"think"`
}

type renderResult struct {
	Prompt string `json:"prompt"`
	Error  string `json:"error,omitempty"`
}

// identifiers lists every field and variable name used anywhere in a parse tree.
func identifiers(n parse.Node) []string {
	var out []string
	switch n := n.(type) {
	case *parse.ListNode:
		if n == nil {
			return nil
		}
		for _, c := range n.Nodes {
			out = append(out, identifiers(c)...)
		}
	case *parse.ActionNode:
		out = identifiers(n.Pipe)
	case *parse.TemplateNode:
		out = identifiers(n.Pipe)
	case *parse.IfNode:
		out = branch(&n.BranchNode)
	case *parse.RangeNode:
		out = branch(&n.BranchNode)
	case *parse.WithNode:
		out = branch(&n.BranchNode)
	case *parse.PipeNode:
		if n == nil {
			return nil
		}
		for _, v := range n.Decl {
			out = append(out, v.Ident...)
		}
		for _, c := range n.Cmds {
			for _, a := range c.Args {
				out = append(out, identifiers(a)...)
			}
		}
	case *parse.ChainNode:
		out = append(identifiers(n.Node), n.Field...)
	case *parse.FieldNode:
		out = n.Ident
	case *parse.VariableNode:
		out = n.Ident
	}
	return out
}

func branch(b *parse.BranchNode) []string {
	out := identifiers(b.Pipe)
	out = append(out, identifiers(b.List)...)
	if b.ElseList != nil {
		out = append(out, identifiers(b.ElseList)...)
	}
	return out
}

var funcs = template.FuncMap{
	"json": func(v any) string {
		b, _ := json.Marshal(v)
		return string(b)
	},
	"currentDate": func(args ...string) string {
		return time.Now().Format("2006-01-02")
	},
	"yesterdayDate": func(args ...string) string {
		return time.Now().AddDate(0, 0, -1).Format("2006-01-02")
	},
	"toTypeScriptType": func(v any) string { return "any" },
}

func uses(tmpl *template.Template, name string) bool {
	for _, t := range tmpl.Templates() {
		for _, id := range identifiers(t.Root) {
			if strings.ToLower(id) == name {
				return true
			}
		}
	}
	return false
}

// cutAtResponse keeps the nodes of list that come before the first {{ .Response }}: the text a
// legacy template gives for the turn the model is about to write. It reports whether it cut.
func cutAtResponse(list *parse.ListNode) bool {
	for i, n := range list.Nodes {
		switch n := n.(type) {
		case *parse.ActionNode:
			for _, id := range identifiers(n.Pipe) {
				if id == "Response" {
					list.Nodes = list.Nodes[:i]
					return true
				}
			}
		case *parse.IfNode:
			if cutBranch(&n.BranchNode) {
				list.Nodes = list.Nodes[:i+1]
				return true
			}
		case *parse.RangeNode:
			if cutBranch(&n.BranchNode) {
				list.Nodes = list.Nodes[:i+1]
				return true
			}
		case *parse.WithNode:
			if cutBranch(&n.BranchNode) {
				list.Nodes = list.Nodes[:i+1]
				return true
			}
		}
	}
	return false
}

func cutBranch(b *parse.BranchNode) bool {
	cut := cutAtResponse(b.List)
	if b.ElseList != nil && cutAtResponse(b.ElseList) {
		cut = true
	}
	return cut
}

func render(c renderCase) (string, error) {
	msgs := append([]message(nil), c.Messages...)
	if c.System != "" && (len(msgs) == 0 || msgs[0].Role != "system") {
		msgs = append([]message{{Role: "system", Content: c.System}}, msgs...)
	}

	var systems []string
	var collated []*templateMessage
	for _, m := range msgs {
		if m.Role == "system" {
			systems = append(systems, m.Content)
		}
		if n := len(collated); n > 0 && collated[n-1].Role == m.Role && m.Role != "tool" {
			collated[n-1].Content += "\n\n" + m.Content
		} else {
			collated = append(collated, &templateMessage{
				Role: m.Role, Content: m.Content, Thinking: m.Thinking,
			})
		}
	}

	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(c.Template)
	if err != nil {
		return "", err
	}
	think := c.Think != nil && *c.Think
	level := ""
	if think {
		level = "medium"
	}
	values := map[string]any{
		"Response":   "",
		"Think":      think,
		"ThinkLevel": level,
		"IsThinkSet": c.Think != nil,
	}
	var sb strings.Builder
	if uses(tmpl, "messages") {
		values["System"] = strings.Join(systems, "\n\n")
		values["Messages"] = collated
		values["Tools"] = nil
		err = tmpl.Execute(&sb, values)
		return sb.String(), err
	}
	if !uses(tmpl, "response") {
		tmpl.Tree.Root.Nodes = append(tmpl.Tree.Root.Nodes, &parse.ActionNode{
			NodeType: parse.NodeAction,
			Pipe: &parse.PipeNode{NodeType: parse.NodePipe, Cmds: []*parse.CommandNode{{
				NodeType: parse.NodeCommand,
				Args:     []parse.Node{&parse.FieldNode{NodeType: parse.NodeField, Ident: []string{"Response"}}},
			}}},
		})
	}
	return renderLegacy(tmpl, collated, values)
}

// renderLegacy runs a template without .Messages once per system/user/assistant group.
func renderLegacy(tmpl *template.Template, msgs []*templateMessage, values map[string]any) (string, error) {
	var sb strings.Builder
	system, prompt, response := "", "", ""
	run := func(t *template.Template) error {
		values["System"], values["Prompt"], values["Response"] = system, prompt, response
		system, prompt, response = "", "", ""
		return t.Execute(&sb, values)
	}
	for _, m := range msgs {
		switch m.Role {
		case "system":
			if prompt != "" || response != "" {
				if err := run(tmpl); err != nil {
					return "", err
				}
			}
			system = m.Content
		case "user":
			if response != "" {
				if err := run(tmpl); err != nil {
					return "", err
				}
			}
			prompt = m.Content
		case "assistant":
			response = m.Content
		}
	}
	tree := &parse.Tree{Name: "last", Root: tmpl.Tree.Root.CopyList()}
	cutAtResponse(tree.Root)
	last, err := template.New("last").Option("missingkey=zero").Funcs(funcs).AddParseTree("last", tree)
	if err != nil {
		return "", err
	}
	err = run(last)
	return sb.String(), err
}

type command struct {
	Name string `json:"name"`
	Args string `json:"args"`
}

type parseResult struct {
	Commands []command `json:"commands"`
	Error    string    `json:"error,omitempty"`
}

type state int

const (
	sNil state = iota
	sName
	sValue
	sParameter
	sMessage
	sComment
)

func isSpace(r rune) bool   { return r == ' ' || r == '\t' }
func isNewline(r rune) bool { return r == '\r' || r == '\n' }
func isAlpha(r rune) bool   { return r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' }
func isDigit(r rune) bool   { return r >= '0' && r <= '9' }

// step gives the state after rune r and the rune to keep (0: none).
func step(s state, r rune) (state, rune, error) {
	switch s {
	case sNil:
		switch {
		case r == '#':
			return sComment, 0, nil
		case isSpace(r) || isNewline(r):
			return sNil, 0, nil
		}
		return sName, r, nil
	case sName:
		switch {
		case isAlpha(r):
			return sName, r, nil
		case isSpace(r):
			return sValue, 0, nil
		}
		return sNil, 0, errors.New("invalid command")
	case sValue:
		if isNewline(r) || isSpace(r) {
			return sNil, r, nil
		}
		return sValue, r, nil
	case sParameter:
		switch {
		case isAlpha(r) || isDigit(r) || r == '_':
			return sParameter, r, nil
		case isSpace(r):
			return sValue, 0, nil
		}
		return sNil, 0, io.ErrUnexpectedEOF
	case sMessage:
		switch {
		case isAlpha(r):
			return sMessage, r, nil
		case isSpace(r):
			return sValue, 0, nil
		}
		return sNil, 0, io.ErrUnexpectedEOF
	case sComment:
		if isNewline(r) {
			return sNil, 0, nil
		}
		return sComment, 0, nil
	}
	return sNil, 0, errors.New("bad state")
}

// unquote: """x""" and "x" give x; a bare word is itself; an unfinished quote is not complete.
func unquote(s string) (string, bool) {
	if strings.HasPrefix(s, `"""`) {
		if len(s) >= 6 && strings.HasSuffix(s, `"""`) {
			return s[3 : len(s)-3], true
		}
		return "", false
	}
	if strings.HasPrefix(s, `"`) {
		if len(s) >= 2 && strings.HasSuffix(s, `"`) {
			return s[1 : len(s)-1], true
		}
		return "", false
	}
	return s, true
}

var commands = map[string]bool{
	"from": true, "license": true, "template": true, "system": true, "adapter": true, "draft": true,
	"renderer": true, "parser": true, "parameter": true, "message": true, "requires": true,
}

func parseModelfile(text string) ([]command, error) {
	text = strings.TrimPrefix(text, "\ufeff")
	var out []command
	var cmd command
	var buf strings.Builder
	var role string
	cur := sNil
	for _, r := range text {
		next, kept, err := step(cur, r)
		if err != nil {
			return nil, err
		}
		if next != cur {
			switch cur {
			case sName:
				name := strings.ToLower(buf.String())
				if !commands[name] {
					return nil, fmt.Errorf("invalid command %q", buf.String())
				}
				switch name {
				case "from":
					cmd.Name = "model"
				case "parameter":
					next = sParameter
				case "message":
					next = sMessage
					cmd.Name = name
				default:
					cmd.Name = name
				}
			case sParameter:
				cmd.Name = buf.String()
			case sMessage:
				role = buf.String()
				if role != "system" && role != "user" && role != "assistant" {
					return nil, fmt.Errorf("invalid message role %q", role)
				}
			case sValue:
				s, ok := unquote(strings.TrimSpace(buf.String()))
				if !ok || isSpace(kept) {
					buf.WriteRune(kept)
					continue
				}
				if role != "" {
					s = role + ": " + s
					role = ""
				}
				cmd.Args = s
				out = append(out, cmd)
			}
			buf.Reset()
			cur = next
		}
		if strconv.IsPrint(kept) {
			buf.WriteRune(kept)
		}
	}
	switch cur {
	case sNil, sComment:
	case sValue:
		s, ok := unquote(strings.TrimSpace(buf.String()))
		if !ok {
			return nil, io.ErrUnexpectedEOF
		}
		if role != "" {
			s = role + ": " + s
		}
		cmd.Args = s
		out = append(out, cmd)
	default:
		return nil, io.ErrUnexpectedEOF
	}
	for _, c := range out {
		if c.Name == "model" {
			return out, nil
		}
	}
	return nil, errors.New("no FROM line")
}

func main() {
	mode := "render"
	if len(os.Args) > 1 {
		mode = os.Args[1]
	}
	in, err := io.ReadAll(bufio.NewReader(os.Stdin))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	var results any
	switch mode {
	case "render":
		var cases []renderCase
		if err := json.Unmarshal(in, &cases); err != nil {
			fmt.Fprintln(os.Stderr, "bad input:", err)
			os.Exit(1)
		}
		rs := make([]renderResult, len(cases))
		for i, c := range cases {
			p, err := render(c)
			rs[i].Prompt = p
			if err != nil {
				rs[i].Error = err.Error()
			}
		}
		results = rs
	case "parse":
		var texts []string
		if err := json.Unmarshal(in, &texts); err != nil {
			fmt.Fprintln(os.Stderr, "bad input:", err)
			os.Exit(1)
		}
		rs := make([]parseResult, len(texts))
		for i, t := range texts {
			cmds, err := parseModelfile(t)
			rs[i].Commands = cmds
			if err != nil {
				rs[i].Error = err.Error()
			}
		}
		results = rs
	default:
		fmt.Fprintln(os.Stderr, "usage: render_template render|parse < input.json")
		os.Exit(2)
	}
	out := bufio.NewWriter(os.Stdout)
	enc := json.NewEncoder(out)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(results); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	out.Flush()
}
