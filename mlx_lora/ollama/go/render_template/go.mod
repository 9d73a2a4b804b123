module render_template

go 1.19
